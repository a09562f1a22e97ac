"""Speculation on vs off at several numbers of concurrent requests, interleaved in one process; prints JSON.

    .venv/bin/python scripts/bench_concurrency.py [--concurrency 1,4,16] [--max-tokens 128]
        [--speculators auto,auto:backoff] [--out F]

The prompts alternate HumanEval and ShareGPT (chat, greedy). At each concurrency, every configuration (plain
decoding, then each `SPECULATOR[:K_POLICY]`, one warm engine each) runs the same prompts, in the order A B C then
C B A, so the machine's drift falls on all alike. Per configuration: output tokens/s, its ratio over plain,
draft tokens per output token, the share of them accepted, and whether every output equals plain decoding's.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from cli.bench import print_report, run_specserve, standard_prompt_sets, warm
from engine.llm_engine import LLMEngine
from model.config import EngineConfig

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--humaneval", default=str(REPO.parent / "shared" / "data" / "humaneval.jsonl.gz"))
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--speculators", default="auto,auto:backoff", help="SPECULATOR[:K_POLICY], comma-separated")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    humaneval, sharegpt = standard_prompt_sets(args.humaneval, 16, 16, REPO / "data")
    prompts = [p for pair in zip(humaneval, sharegpt) for p in pair]
    base = {"max_model_len": 4096, "kv_cache_gib": 1.0, "num_speculative_tokens": args.k}
    configs = {"plain": EngineConfig(speculator="none", **base)}
    for name in args.speculators.split(","):
        speculator, _, policy = name.partition(":")
        configs[name] = EngineConfig(speculator=speculator, k_policy=policy or "auto", **base)
    engines = {name: warm(LLMEngine(config)) for name, config in configs.items()}
    report: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    for level in levels:
        batch = prompts[: 8 if level == 1 else max(16, 2 * level)]
        wall = dict.fromkeys(engines, 0.0)
        tokens = dict.fromkeys(engines, 0)
        drafted = dict.fromkeys(engines, 0)
        accepted = dict.fromkeys(engines, 0)
        outputs: dict[str, list] = {}
        for order in (list(engines), list(engines)[::-1]):
            for name in order:
                engine = engines[name]
                before = (engine.spec.drafted, engine.spec.accepted)
                result = run_specserve(batch, configs[name], args.max_tokens, level, engine=engine, warm_up=False)
                wall[name] += result.wall_s
                tokens[name] += sum(len(r["output_token_ids"]) for r in result.requests)
                drafted[name] += engine.spec.drafted - before[0]
                accepted[name] += engine.spec.accepted - before[1]
                outputs[name] = [r["output_token_ids"] for r in result.requests]
        rate = {name: tokens[name] / wall[name] for name in engines}
        report[f"concurrency_{level}"] = {
            name: {
                "prompts": len(batch),
                "output_tokens_per_s": round(rate[name], 1),
                "vs_plain": round(rate[name] / rate["plain"], 3),
                "drafted_per_output_token": round(drafted[name] / tokens[name], 3),
                "acceptance": round(accepted[name] / drafted[name], 3) if drafted[name] else None,
                "equals_plain": outputs[name] == outputs["plain"],
            }
            for name in engines
        }
        print(json.dumps({f"concurrency_{level}": report[f"concurrency_{level}"]}), flush=True)
    print_report(report, args.out)


if __name__ == "__main__":
    main()
