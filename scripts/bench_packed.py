"""Packed GGUF weights against float32 weights: plain decoding, one request at a time; prints one JSON object.

    .venv/bin/python scripts/bench_packed.py [--prompts 6] [--max-tokens 128] [--int8]

Both engines load the default model (or `--model`, a quantized GGUF), `weights: fp32` and `weights: packed`,
and run the same HumanEval chat prompts greedily with ignore_eos, interleaved prompt by prompt as A-B-B-A, so
drift of the machine's speed weighs on both alike. Decode rates leave out each request's prefill (time to
first token). Bytes read per step are the matrices a decode step multiplies (linear layers and the LM head, in
their stored form: float32 or GGUF blocks); GB/s is that times decode steps per second. `roofline` adds the
K/V a step reads (the mean context of the decode steps) and sets the achieved rate against this machine's
measured streaming-read rate (`scripts/roofline.py`).

With `--int8` the second engine is `quantization: int8` on the float folder of the model (another model than
float32: `identical_tokens` then says how often the two agree, not whether they must).

With `--widths` both engines are packed and the packed kernel runs its AVX2 paths in one and its AVX-512 paths
in the other (on a CPU and build that has them; the width is process-wide, set before each run, each with the
GEMM rows measured for it); the report adds each side's step time by verified rows (one sequence, 128 tokens
of context: the cost of verifying k drafts), measured in alternation before the prompts run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts.roofline, run as a script

from cli.bench import print_report  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from model.config import EngineConfig  # noqa: E402
from model.cpu_kernels import load_kernels  # noqa: E402
from model.loader import resolve_model  # noqa: E402
from model.quant_gemm_rows import tune_gemm_rows  # noqa: E402
from sampling.params import SamplingParams  # noqa: E402
from scripts.roofline import (  # noqa: E402
    embedding_row_bytes,
    kv_bytes_per_token,
    read_bandwidth_gb_per_s,
    roofline,
    weight_bytes,
)
from speculator.cost_model import measure_step_times  # noqa: E402

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval.jsonl.gz"  # as tests/conftest.py


def prompts(path: Path, n: int) -> list[list[dict]]:
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f][:n]
    return [[{"role": "user", "content": f"Complete this function:\n{r['prompt']}"}] for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--humaneval", type=Path, default=HUMANEVAL)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--int8", action="store_true", help="int8 weights of the float folder against float32")
    p.add_argument("--widths", action="store_true", help="the packed kernel's AVX2 paths against its AVX-512 paths")
    args = p.parse_args()
    common = dict(model=args.model, kv_cache_gib=0.25, max_model_len=2048)
    widths = {"avx2": 256, "avx512": 512} if args.widths else {}
    if args.int8:
        common["model"] = str(resolve_model(args.model))
        configs = {"fp32": EngineConfig(weights="fp32", **common), "int8": EngineConfig(quantization="int8", **common)}
    elif args.widths:
        configs = {w: EngineConfig(weights="packed", **common) for w in widths}
    else:
        configs = {w: EngineConfig(weights=w, **common) for w in ("fp32", "packed")}
    kernels = load_kernels() if widths else None
    if kernels is not None and 512 not in kernels.quant_matmul_widths():
        raise SystemExit("--widths: the packed kernel has no AVX-512 path on this CPU")

    def use(name: str) -> None:
        """The kernel width of engine `name` (and the GEMM rows measured for it), with --widths."""
        if widths:
            kernels.set_quant_width(widths[name])
            tune_gemm_rows(kernels, engines[name].runner.model.packed_matrices())

    engines = {}
    for name, config in configs.items():
        if widths:
            kernels.set_quant_width(widths[name])
        engines[name] = LLMEngine(config)
    a, b = list(engines)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    step_ms = {}  # before any request: the measurement writes K/V into the pool's blocks
    for name in (a, b, b, a) if widths else ():
        use(name)
        t = measure_step_times(engines[name].runner, rows=(1, 2, 3, 4, 5, 6, 8, 16, 32))
        best = step_ms.setdefault(name, {r: float("inf") for r in t.rows})
        step_ms[name] = {r: min(best[r], s * 1e3) for r, s in zip(t.rows, t.seconds)}
    for name, engine in engines.items():  # warm up outside the measured runs
        use(name)
        engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, ignore_eos=True))
    sums = {w: {"tokens": 0, "decode_tokens": 0, "latency_s": 0.0, "decode_s": 0.0, "context": 0} for w in engines}
    same = True
    for chat in prompts(args.humaneval, args.prompts):
        outs = {}
        for w in (a, b, b, a):
            use(w)
            out = engines[w].generate([chat], params)[0]
            s, m = sums[w], out.metrics
            s["tokens"] += len(out.output_token_ids)
            s["decode_tokens"] += len(out.output_token_ids) - 1
            s["latency_s"] += m.latency
            s["decode_s"] += m.latency - m.ttft
            steps, prompt_len = len(out.output_token_ids) - 1, len(out.prompt_token_ids)
            s["context"] += steps * prompt_len + steps * (steps + 1) // 2  # step i attends prompt + i tokens
            outs.setdefault(w, out.output_token_ids)
        same &= outs[a] == outs[b]
    report = {"prompts": args.prompts, "max_tokens": args.max_tokens, "identical_tokens": same}
    if step_ms:
        report["step_ms_by_rows"] = {w: {r: round(ms, 2) for r, ms in t.items()} for w, t in step_ms.items()}
        report["step_ratio_by_rows"] = {r: round(step_ms[a][r] / step_ms[b][r], 3) for r in step_ms[a]}
    bandwidth = read_bandwidth_gb_per_s()
    report["roofline"] = {"read_bandwidth_gb_per_s": round(bandwidth, 2), "threads": torch.get_num_threads()}
    for w, engine in engines.items():
        s, nbytes = sums[w], weight_bytes(engine)
        steps_per_s = s["decode_tokens"] / s["decode_s"]
        report[w] = {
            "output_tokens_per_s": round(s["tokens"] / s["latency_s"], 2),
            "decode_tokens_per_s": round(steps_per_s, 2),
            "weight_bytes_per_step": nbytes,
            "weight_gb_per_s": round(nbytes * steps_per_s / 1e9, 2),
        }
        kv = s["context"] / s["decode_tokens"] * kv_bytes_per_token(engine)
        report["roofline"][w] = roofline(nbytes + embedding_row_bytes(engine), kv, steps_per_s, bandwidth)
    report["ratio_output_tokens_per_s"] = round(report[b]["output_tokens_per_s"] / report[a]["output_tokens_per_s"], 3)
    report["ratio_decode_tokens_per_s"] = round(report[b]["decode_tokens_per_s"] / report[a]["decode_tokens_per_s"], 3)
    print_report(report, args.json)


if __name__ == "__main__":
    main()
