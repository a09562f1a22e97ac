"""Which path the packed kernel takes at 17-64 rows, measured on this machine.

The packed kernel multiplies 17-64 rows (full decode batches, wide verification trees) either by its own AVX2
tile path or by dequantizing 128-row tiles of W for ATen's GEMM. Which is faster depends on the CPU: where the
GEMM has AVX-512 it runs about twice the tile path's FMAs, on AVX2-only CPUs the tile path can win. So at load
the runner times both on the model's own matrices (weighted by how often a step multiplies each) and sets the
row count above which the kernel hands a matmul to the GEMM (`set_quant_gemm_rows`). Both paths compute the
dequantized model's products in float32, so the choice moves only rounding.
"""

from __future__ import annotations

import time

import torch

from model.quant import PackedWeight

ROW_CHOICES = (16, 24, 32, 48, 64)  # the kernel's own paths below 17 rows are faster than any GEMM
MARGIN = 0.97  # the GEMM must be at least 3% faster to be chosen (timing noise must not flip a tie)

_tuned: dict[tuple, int] = {}  # per set of matrix shapes, for this process (engines of one model share it)


def step_seconds(kernels, matrices: list[tuple[PackedWeight, int]], x: dict[int, torch.Tensor], gemm_rows: int):
    """Seconds the matmuls of one step take: each matrix once, times how often a step multiplies it."""
    total = 0.0
    for w, count in matrices:
        start = time.perf_counter()
        kernels.quant_matmul(x[w.in_features], w.data, w.qtype, w.out_features, gemm_rows=gemm_rows)
        total += count * (time.perf_counter() - start)
    return total


def tune_gemm_rows(kernels, matrices: list[tuple[PackedWeight, int]], rounds: int = 3) -> int:
    """Set and return the rows above which the packed kernel uses the GEMM path, timed on `matrices` (each with
    how many times a step multiplies it) at 24-64 rows, the two paths alternating; the best of `rounds` each.
    Rows stay with the kernel's tile path up to the largest count where the GEMM is not clearly faster."""
    key = tuple((w.qtype, w.out_features, w.in_features, count) for w, count in matrices)
    if key not in _tuned:
        _tuned[key] = measure(kernels, matrices, rounds) if matrices else ROW_CHOICES[-1]
    kernels.set_quant_gemm_rows(_tuned[key])
    return _tuned[key]


def measure(kernels, matrices: list[tuple[PackedWeight, int]], rounds: int) -> int:
    gen = torch.Generator().manual_seed(0)
    gemm_rows = ROW_CHOICES[-1]
    for below, rows in reversed(list(zip(ROW_CHOICES, ROW_CHOICES[1:]))):
        x = {k: torch.randn(rows, k, generator=gen) for k in {w.in_features for w, _ in matrices}}
        step_seconds(kernels, matrices, x, 0)  # warm both paths' scratch
        step_seconds(kernels, matrices, x, rows)
        tile = gemm = float("inf")
        for r in range(rounds):
            order = [(0, True), (rows, False)] if r % 2 else [(rows, False), (0, True)]
            for limit, is_gemm in order:
                seconds = step_seconds(kernels, matrices, x, limit)
                if is_gemm:
                    gemm = min(gemm, seconds)
                else:
                    tile = min(tile, seconds)
        if gemm >= MARGIN * tile:
            break
        gemm_rows = below
    return gemm_rows
