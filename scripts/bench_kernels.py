"""The CPU kernels against the PyTorch paths they replace, side by side; prints one JSON object.

    .venv/bin/python scripts/bench_kernels.py [--rows 1 2 5 8 16 24 32] [--packed-rows 16 32 64 512]
                                              [--contexts 300 1000 3000]

- matmul: every linear layer of the default model's shape (30 layers and the LM head, float32, fresh random
  weights, so they are read from memory as in decoding) on `rows` rows, through each path of
  `model.parallel.linear`: F.linear, oneDNN's prepacked GEMM (used above SMALL_MATMUL_MAX_ROWS rows, and
  everywhere without the kernels) and the C++ small matmul. Where the kernel stops winning sets
  SMALL_MATMUL_MAX_ROWS.
- packed_matmul: the same shapes as Q4_1 blocks (random, 30 layers and the LM head) on 16-64 rows (decode
  batches) and 128/512 (prefill): the packed kernel's own paths (`kernel_tiles`; on a CPU with AVX-512 also its
  AVX2 paths, `kernel_tiles_avx2`), its GEMM by dequantized 128-row tiles, and the whole matrix dequantized for
  one GEMM; and the row counts `model.quant_gemm_rows.tune_gemm_rows` gives
  the GEMM on this machine (it decides between the first two at load). Where the whole matrix overtakes the
  tiles sets QUANT_MATMUL_MAX_ROWS.
- attention: against `context`-token sequences in each of 30 layers' pages, one decode row, one 1 + 4
  verification and 16 sequences' decode rows: the in-place kernel vs gathering the pages and SDPA
  (TorchPagedAttention).
- fused ops: a layer's RMSNorms with their residual adds, RoPE and silu * up on 1, 16 and 512 rows, 30 layers:
  the PyTorch ops vs the fused kernels.
The two sides alternate repeat by repeat; the figures are medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from cli.bench import print_report
from model.attention.cpu import CpuPagedAttention
from model.attention.paged import TorchPagedAttention
from model.cpu_kernels import QUANT_KERNEL_MAX_ROWS, SMALL_MATMUL_MAX_ROWS, load_kernels
from model.decoder import rotate
from model.parallel import cpu_packed, linear
from model.quant import BLOCK as BLOCK_WEIGHTS
from model.quant import PackedWeight
from model.quant_gemm_rows import tune_gemm_rows

HIDDEN, INTERMEDIATE, QKV, LAYERS, VOCAB = 576, 1536, 960, 30, 49152  # SmolLM2-135M
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def side_by_side(runs: dict, repeats: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_matmul(kernels, rows: list[int], repeats: int) -> list[dict]:
    shapes = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)] * LAYERS
    weights = [torch.randn(n, k) for n, k in shapes + [(VOCAB, HIDDEN)]]
    packed = [cpu_packed(w) for w in weights]
    gb = sum(w.numel() * 4 for w in weights) / 1e9
    # the three paths of model.parallel.linear: F.linear, oneDNN's prepacked GEMM, the C++ small matmul
    paths = {"f_linear": lambda w, p: (None, None), "onednn": lambda w, p: (p, None)}
    paths["kernel"] = lambda w, p: (None, kernels.small_matmul)
    out = []
    for m in rows:
        x = {k: torch.randn(m, k) for k in (HIDDEN, INTERMEDIATE)}

        def run(path: str, x: dict = x) -> None:
            for w, p in zip(weights, packed):
                packed_w, small = paths[path](w, p)
                linear(x[w.shape[1]], w, packed_w, small=small)

        names = [n for n in paths if n != "kernel" or m <= SMALL_MATMUL_MAX_ROWS]
        t = side_by_side({n: (lambda n=n: run(n)) for n in names}, repeats)
        row: dict = {"rows": m}
        for n, sec in t.items():
            row |= {f"{n}_ms": round(sec * 1e3, 2), f"{n}_gb_per_s": round(gb / sec, 1)}
        row["onednn_vs_f_linear"] = round(t["f_linear"] / t["onednn"], 3)
        if "kernel" in t:
            row["kernel_vs_onednn"] = round(t["onednn"] / t["kernel"], 3)
        out.append(row)
    return out


def random_q4_1(n: int, k: int, gen: torch.Generator) -> PackedWeight:
    """An [n, k] Q4_1 matrix of random nibbles with small positive scales and negative minimums."""
    blocks = torch.randint(0, 256, (n, k // BLOCK_WEIGHTS, 20), dtype=torch.uint8, generator=gen)
    scales = torch.stack(
        [
            torch.rand(n, k // BLOCK_WEIGHTS, generator=gen) * 0.01,
            -torch.rand(n, k // BLOCK_WEIGHTS, generator=gen) * 0.05,
        ],
        2,
    )
    blocks[:, :, :4] = scales.half().contiguous().view(torch.uint8).view(n, -1, 4)
    return PackedWeight(3, blocks.reshape(n, -1).contiguous(), n, k)


def bench_packed_matmul(kernels, rows: list[int], repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    shapes = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
    weights = [random_q4_1(n, k, gen) for n, k in shapes * LAYERS] + [random_q4_1(VOCAB, HIDDEN, gen)]
    before = kernels.quant_gemm_mask()
    tuned = tune_gemm_rows(kernels, weights)
    kernels.set_quant_gemm_mask(before)
    out = []
    for m in rows:
        x = {k: torch.randn(m, k, generator=gen) for k in (HIDDEN, INTERMEDIATE)}

        def run(path: str, x: dict = x) -> None:
            for w in weights:
                xs = x[w.in_features]
                if path == "whole_matrix_gemm":
                    F.linear(xs, w.dequantize(kernels))
                else:
                    width = 256 if path == "kernel_tiles_avx2" else -1
                    gemm_rows = 0 if path == "tile_gemm" else 64
                    kernels.quant_matmul(xs, w.data, w.qtype, w.out_features, width=width, gemm_rows=gemm_rows)

        names = ["whole_matrix_gemm", "tile_gemm"]
        if m <= QUANT_KERNEL_MAX_ROWS:
            names += ["kernel_tiles"] + (["kernel_tiles_avx2"] if 512 in kernels.quant_matmul_widths() else [])
        t = side_by_side({n: (lambda n=n: run(n)) for n in names}, repeats)
        row: dict = {"rows": m} | {f"{n}_ms": round(sec * 1e3, 2) for n, sec in t.items()}
        if "kernel_tiles" in t:
            row["tile_gemm_vs_kernel_tiles"] = round(t["kernel_tiles"] / t["tile_gemm"], 3)
        if "kernel_tiles_avx2" in t:
            row["avx512_vs_avx2"] = round(t["kernel_tiles_avx2"] / t["kernel_tiles"], 3)
        row["tile_gemm_vs_whole_matrix"] = round(t["whole_matrix_gemm"] / t["tile_gemm"], 3)
        out.append(row)
    return {"gemm_rows_chosen": list(tuned), "rows": out}


def bench_attention(kernels, contexts: list[int], repeats: int) -> list[dict]:
    """Per context length: one decode row, one 1 + 4 verification (5 rows of one sequence) and 16 sequences'
    decode rows, over scattered pages of 30 layers."""
    cases = [(1, 1), (1, 5), (16, 1)]  # (sequences, rows per sequence)
    num_blocks = 16 * -(-max(contexts) // BLOCK) + 2
    pages = torch.randn(LAYERS, 2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    backends = {
        "gather_sdpa": TorchPagedAttention(BLOCK, torch.device("cpu")),
        "inplace_kernel": CpuPagedAttention(BLOCK, torch.device("cpu"), kernels),
    }
    out = []
    for n in contexts:
        for seqs, rows in cases:
            width = -(-n // BLOCK)
            blocks = (torch.randperm(num_blocks - 1)[: seqs * width] + 1).view(seqs, width).tolist()
            q = torch.randn(seqs * rows, HEADS, HEAD_DIM)
            slots = np.zeros(seqs * rows, dtype=np.int64)
            metas = {k: b.prepare([rows] * seqs, [n] * seqs, blocks, slots) for k, b in backends.items()}

            def layers(name: str, metas: dict = metas, q: torch.Tensor = q) -> None:
                for i in range(LAYERS):
                    for g in metas[name].groups:
                        backends[name]._attend(q, pages[i, 0], pages[i, 1], g, HEAD_DIM**-0.5)

            t = side_by_side({k: (lambda k=k: layers(k)) for k in backends}, repeats)
            out.append(
                {"context": n, "sequences": seqs, "rows_per_sequence": rows}
                | {f"{k}_ms_per_step": round(v * 1e3, 2) for k, v in t.items()}
                | {"speedup": round(t["gather_sdpa"] / t["inplace_kernel"], 3)}
            )
    return out


def fused_op_runs(kernels, m: int) -> dict:
    """One step's element-wise work on `m` rows (30 layers) as PyTorch ops and as the fused kernels."""
    norm_w, x, delta = torch.randn(HIDDEN), torch.randn(m, HIDDEN), torch.randn(m, HIDDEN)
    qk = torch.randn(m, HEADS + 2 * KV_HEADS, HEAD_DIM)[:, : HEADS + KV_HEADS]  # q and k heads of a qkv row
    cos, sin = torch.randn(m, 1, HEAD_DIM), torch.randn(m, 1, HEAD_DIM)
    gate_up = torch.randn(m, 2 * INTERMEDIATE)

    def torch_ops() -> None:
        for _ in range(LAYERS):
            for _ in range(2):
                x.add_(delta)
                F.rms_norm(x, (HIDDEN,), norm_w, 1e-5)
            rotate(qk, cos, sin)
            gate, up = gate_up.chunk(2, dim=-1)
            F.silu(gate) * up

    def fused() -> None:
        for _ in range(LAYERS):
            for _ in range(2):
                kernels.rms_norm(x, delta, norm_w, 1e-5)
            kernels.rope_(qk, cos, sin)
            kernels.silu_mul(gate_up)

    return {"torch": torch_ops, "fused": fused}


def bench_fused_ops(kernels, rows: list[int], repeats: int) -> list[dict]:
    """A layer's element-wise steps (two RMSNorms with their residual adds, RoPE on q and k, silu * up)."""
    out = []
    for m in rows:
        t = side_by_side(fused_op_runs(kernels, m), repeats)
        out.append(
            {"rows": m}
            | {f"{k}_ms_per_step": round(v * 1e3, 2) for k, v in t.items()}
            | {"speedup": round(t["torch"] / t["fused"], 3)}
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 8, 16, 24, 32])
    ap.add_argument("--packed-rows", type=int, nargs="+", default=[16, 24, 32, 48, 64, 128, 512])
    ap.add_argument("--contexts", type=int, nargs="+", default=[300, 1000, 3000])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    kernels = load_kernels()
    torch.set_grad_enabled(False)
    report = {
        "settings": vars(args) | {"threads": torch.get_num_threads()},
        "matmul": bench_matmul(kernels, args.rows, args.repeats),
        "packed_matmul": bench_packed_matmul(kernels, args.packed_rows, max(3, args.repeats // 3)),
        "attention": bench_attention(kernels, args.contexts, args.repeats),
        "fused_ops": bench_fused_ops(kernels, [1, 16, 512], args.repeats),
    }
    print_report(report, args.out)


if __name__ == "__main__":
    main()
