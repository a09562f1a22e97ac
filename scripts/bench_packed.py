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
from model.loader import resolve_model  # noqa: E402
from sampling.params import SamplingParams  # noqa: E402
from scripts.roofline import (  # noqa: E402
    embedding_row_bytes,
    kv_bytes_per_token,
    read_bandwidth_gb_per_s,
    roofline,
    weight_bytes,
)

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
    args = p.parse_args()
    common = dict(model=args.model, kv_cache_gib=0.25, max_model_len=2048)
    if args.int8:
        common["model"] = str(resolve_model(args.model))
        configs = {"fp32": EngineConfig(weights="fp32", **common), "int8": EngineConfig(quantization="int8", **common)}
    else:
        configs = {w: EngineConfig(weights=w, **common) for w in ("fp32", "packed")}
    engines = {name: LLMEngine(config) for name, config in configs.items()}
    b = "int8" if args.int8 else "packed"
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    for engine in engines.values():  # warm up outside the measured runs
        engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, ignore_eos=True))
    sums = {w: {"tokens": 0, "decode_tokens": 0, "latency_s": 0.0, "decode_s": 0.0, "context": 0} for w in engines}
    same = True
    for chat in prompts(args.humaneval, args.prompts):
        outs = {}
        for w in ("fp32", b, b, "fp32"):
            out = engines[w].generate([chat], params)[0]
            s, m = sums[w], out.metrics
            s["tokens"] += len(out.output_token_ids)
            s["decode_tokens"] += len(out.output_token_ids) - 1
            s["latency_s"] += m.latency
            s["decode_s"] += m.latency - m.ttft
            steps, prompt_len = len(out.output_token_ids) - 1, len(out.prompt_token_ids)
            s["context"] += steps * prompt_len + steps * (steps + 1) // 2  # step i attends prompt + i tokens
            outs.setdefault(w, out.output_token_ids)
        same &= outs["fp32"] == outs[b]
    report = {"prompts": args.prompts, "max_tokens": args.max_tokens, "identical_tokens": same}
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
    report["ratio_output_tokens_per_s"] = round(
        report[b]["output_tokens_per_s"] / report["fp32"]["output_tokens_per_s"], 3
    )
    report["ratio_decode_tokens_per_s"] = round(
        report[b]["decode_tokens_per_s"] / report["fp32"]["decode_tokens_per_s"], 3
    )
    print_report(report, args.json)


if __name__ == "__main__":
    main()
