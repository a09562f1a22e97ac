"""Drafters side by side on one prompt set, interleaved prompt by prompt with plain decoding; prints JSON.

    .venv/bin/python scripts/bench_drafters.py --prompts test.jsonl --max-tokens 128 \
        --drafter mlp=/path/he-mlp --drafter eagle=/path/he-eagle [--speculators ngram,suffix] [--k 4] [--out F]
        [--plan PLAN.json]  # `specserve profile`'s plan, run as --speculator auto
        [--k-policies auto,backoff]  # auto under each k policy
        [--candidates 1,3]  # each drafter also verifying up to 3 candidate paths a step (NAME:c3)

Every prompt goes through plain decoding and each drafter in turn (greedy, batch 1, one engine each, kept
warm), so the machine's drift falls on all alike. Per configuration: output tokens/s and its ratio over plain,
tokens per verification step, acceptance by position, and whether every output equals plain decoding's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cli.bench import run_alternating, run_specserve, warm
from cli.prompts import load_prompts
from engine.llm_engine import LLMEngine
from model.config import EngineConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--drafter", action="append", default=[], help="KIND=DIR (mlp or eagle), repeatable")
    ap.add_argument("--speculators", default="", help="drafters without a folder, e.g. ngram,suffix")
    ap.add_argument("--plan", default=None, help="also --speculator auto with this plan (specserve profile)")
    ap.add_argument(
        "--candidates", default="1", help="candidate paths per step, e.g. 1,3 (NAME:cN for N > 1; chains otherwise)"
    )
    ap.add_argument("--k-policy", default="auto", help="k policy of the single drafters (auto, cost, backoff)")
    ap.add_argument("--k-policies", default="auto", help="auto's k policies, e.g. auto,backoff (auto, auto:backoff)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    specs = load_prompts(args.prompts, args.limit)
    base = {"kv_cache_gib": 0.5, "num_speculative_tokens": args.k}
    configs = {"plain": EngineConfig(**base)}
    for n in (int(c) for c in args.candidates.split(",")):
        tag = "" if n == 1 else f":c{n}"
        for name in filter(None, args.speculators.split(",")):
            configs[name + tag] = EngineConfig(**base, speculator=name, num_candidates=n, k_policy=args.k_policy)
        kinds = [item.split("=", 1)[0] for item in args.drafter]
        for item in args.drafter:
            kind, folder = item.split("=", 1)
            name = kind if kinds.count(kind) == 1 else f"{kind}[{Path(folder).name}]"  # two of a kind: by folder
            configs[name + tag] = EngineConfig(
                **base, speculator=kind, speculator_model=folder, num_candidates=n, k_policy=args.k_policy
            )
    if args.plan:
        for policy in args.k_policies.split(","):
            name = "auto" if policy == "auto" else f"auto:{policy}"
            configs[name] = EngineConfig(**base, speculator="auto", plan=args.plan, k_policy=policy)
    engines = {name: warm(LLMEngine(cfg)) for name, cfg in configs.items()}
    runners = {
        name: (lambda s, e=e, c=configs[name]: run_specserve(s, c, args.max_tokens, 1, engine=e, warm_up=False))
        for name, e in engines.items()
    }
    merged = run_alternating(runners, specs)
    plain = merged["plain"].to_json({})
    plain_tps = plain["summary"]["output_tokens_per_s"]
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "prompts": args.prompts,
        "num_prompts": len(specs),
        "max_tokens": args.max_tokens,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "configs": {},
    }
    for name, result in merged.items():
        js = result.to_json({})
        summary = js["summary"]
        same = [r["output_token_ids"] for r in js["requests"]] == [r["output_token_ids"] for r in plain["requests"]]
        report["configs"][name] = {
            "output_tokens_per_s": summary["output_tokens_per_s"],
            "speed_over_plain": round(summary["output_tokens_per_s"] / plain_tps, 3),
            "tokens_per_step": summary["mean_accepted_per_step"],
            "acceptance_rate": summary["acceptance_rate"],
            "acceptance_by_position": summary["acceptance_by_position"],
            "identical_to_plain": same,
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
