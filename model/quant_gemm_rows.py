"""Which row counts the packed kernel hands to its GEMM path, measured on this machine.

The packed kernel multiplies 1-64 rows (decode steps, verification, full batches) by its own AVX-512 or AVX2
paths or by dequantizing 128-row tiles of W for ATen's GEMM. Which is faster depends on the CPU, the kernel's
vector width and the row count: on an AVX-512 CPU the GEMM beat the kernel's AVX2 paths at 2-8 and 48-64 rows,
and its AVX-512 paths only from about 48 rows. So at load the runner times both on the model's own
matrices (every layer's, read from memory as a step reads them) and sets the row counts that go to the GEMM
(`set_quant_gemm_mask`). Both paths compute the dequantized model's products in float32, so the choice moves
only rounding.
"""

from __future__ import annotations

import time

import torch

from model.quant import PackedWeight

MEASURED_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # a row count between two takes the larger one's path
MARGIN = 0.97  # the GEMM must be at least 3% faster to be chosen (timing noise must not flip a tie)

# per kernel width and set of distinct matrix shapes, for this process: engines of one model, and a draft model
# truncated from it, share one measurement (and one mask: a second measurement would overwrite the first's)
_tuned: dict[tuple, tuple[int, ...]] = {}


def mask_of(rows: tuple[int, ...]) -> int:
    """The kernel's mask for GEMM row counts `rows`, each measured count standing for those down to the one below."""
    mask, below = 0, 0
    for m in MEASURED_ROWS:
        if m in rows:
            for r in range(below + 1, m + 1):
                mask |= 1 << (r - 1)
        below = m
    return mask


def tune_gemm_rows(kernels, matrices: list[PackedWeight], rounds: int = 2) -> tuple[int, ...]:
    """Set the kernel's GEMM mask from a measurement on `matrices` (all a step multiplies) and return the
    measured row counts where the GEMM was clearly faster; the two paths alternate, the best of `rounds` each.
    Measured once per kernel width (`set_quant_width`) and set of shapes in a process (a few seconds for the
    default model); a later call sets the mask measured before."""
    key = (kernels.quant_width(), *sorted({(w.qtype, w.out_features, w.in_features) for w in matrices}))
    if key not in _tuned:
        _tuned[key] = measure(kernels, matrices, rounds) if matrices else ()
    kernels.set_quant_gemm_mask(mask_of(_tuned[key]))
    return _tuned[key]


def step_seconds(kernels, matrices: list[PackedWeight], x: dict[int, torch.Tensor], gemm_rows: int) -> float:
    start = time.perf_counter()
    for w in matrices:
        kernels.quant_matmul(x[w.in_features], w.data, w.qtype, w.out_features, gemm_rows=gemm_rows)
    return time.perf_counter() - start


def measure(kernels, matrices: list[PackedWeight], rounds: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(0)
    gemm_rows = []
    for rows in MEASURED_ROWS:
        x = {k: torch.randn(rows, k, generator=gen) for k in {w.in_features for w in matrices}}
        best = {True: float("inf"), False: float("inf")}
        for r in range(rounds + 1):  # round 0 warms both paths' scratch and is not counted
            for gemm in (True, False) if r % 2 else (False, True):
                seconds = step_seconds(kernels, matrices, x, 0 if gemm else 64)
                if r:
                    best[gemm] = min(best[gemm], seconds)
        if best[True] < MARGIN * best[False]:
            gemm_rows.append(rows)
    return tuple(gemm_rows)
