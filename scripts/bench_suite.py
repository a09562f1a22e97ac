"""The performance checks of the engine, side by side in one process; prints one JSON object.

    .venv/bin/python scripts/bench_suite.py [--humaneval-limit 10] [--max-tokens 128] [--concurrency 16]
        [--max-prompt-tokens N] [--out results/suite.json]

- batch 1, HumanEval chat prompts: specserve plain vs transformers `generate`, and n-gram vs plain, the
  three alternating prompt by prompt (the machine's drifting speed then hits all three alike);
- `--concurrency` (16) ShareGPT single-turn prompts: specserve with all of them in flight vs `generate` one at a
  time, and n-gram vs plain at batch 1 (the prompt set where lookup has least to copy); with
  `--max-prompt-tokens N`, the first of them whose chat prompt is at most N tokens (short-prompt serving);
- KV waste (allocated minus used slots per live sequence) from the same runs.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from cli.bench import (
    HFBaseline,
    print_report,
    run_alternating,
    run_specserve,
    short_prompts,
    standard_prompt_sets,
    warm,
)
from engine.llm_engine import LLMEngine
from model.config import EngineConfig

REPO = Path(__file__).resolve().parents[1]


def tps(result) -> float:
    return result.to_json({})["summary"]["output_tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--humaneval", default=str(REPO.parent / "shared" / "data" / "humaneval.jsonl.gz"))
    ap.add_argument("--humaneval-limit", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16, help="ShareGPT prompts, all in flight at once")
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="only ShareGPT prompts this short")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    c = args.concurrency
    pool = c if args.max_prompt_tokens is None else 8 * c
    humaneval, sharegpt = standard_prompt_sets(args.humaneval, args.humaneval_limit, pool, REPO / "data")
    n = args.max_tokens
    plain = EngineConfig()
    ngram = EngineConfig(speculator="ngram", num_speculative_tokens=args.k)
    runs = {}
    t0 = time.time()
    # Every specserve comparison gets fresh engines, so no run profits from another's prefix cache.
    hf = HFBaseline.load(None, "float32")
    if args.max_prompt_tokens is not None:
        sharegpt = short_prompts(sharegpt, hf.tokenizer, hf.vocab_size, args.max_prompt_tokens, c)

    def alternating(prefix: str, specs: list, with_hf: bool) -> dict:
        engines = {"plain": warm(LLMEngine(plain)), "ngram": warm(LLMEngine(ngram))}
        runners = {f"{prefix}_hf_b1": lambda s: hf.run(s, n)} if with_hf else {}
        for name, e in engines.items():
            runners[f"{prefix}_{name}_b1"] = lambda s, e=e: run_specserve(s, e.config, n, 1, engine=e, warm_up=False)
        return run_alternating(runners, specs)

    runs.update(alternating("humaneval", humaneval, with_hf=True))
    runs["sharegpt_hf_b1"] = hf.run(sharegpt, n)
    runs[f"sharegpt_plain_c{c}"] = run_specserve(sharegpt, plain, n, c)
    runs.update(alternating("sharegpt", sharegpt, with_hf=False))
    summaries = {k: v.to_json({})["summary"] for k, v in runs.items()}
    report = {
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": vars(args),
        "ratios": {
            "plain_b1_vs_hf (goal >= 1.5)": round(tps(runs["humaneval_plain_b1"]) / tps(runs["humaneval_hf_b1"]), 3),
            f"plain_c{c}_vs_hf_sequential (goal >= {12 if c >= 32 else 5})": round(
                tps(runs[f"sharegpt_plain_c{c}"]) / tps(runs["sharegpt_hf_b1"]), 3
            ),
            "ngram_vs_plain_humaneval (goal >= 1.3)": round(
                tps(runs["humaneval_ngram_b1"]) / tps(runs["humaneval_plain_b1"]), 3
            ),
            "ngram_vs_plain_sharegpt (goal >= 0.9)": round(
                tps(runs["sharegpt_ngram_b1"]) / tps(runs["sharegpt_plain_b1"]), 3
            ),
        },
        "greedy_outputs_equal_hf": {
            "humaneval": sum(
                a["output_token_ids"] == b["output_token_ids"]
                for a, b in zip(runs["humaneval_hf_b1"].requests, runs["humaneval_plain_b1"].requests)
            ),
            "of": len(humaneval),
        },
        "kv_waste_slots_per_seq_max": max(s.get("kv_waste_slots_per_seq_max", 0) for s in summaries.values()),
        "block_size": plain.block_size,
        "runs": {
            k: {
                x: s[x]
                for x in (
                    "output_tokens",
                    "wall_s",
                    "output_tokens_per_s",
                    "acceptance_rate",
                    "mean_accepted_per_step",
                    "mean_ttft_s",
                    "mean_itl_s",
                )
                if x in s
            }
            for k, s in summaries.items()
        },
        "total_s": round(time.time() - t0, 1),
    }
    print_report(report, args.out)


if __name__ == "__main__":
    main()
