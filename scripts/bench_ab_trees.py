"""A change against its base, interleaved: the same prompts through two checkouts of the engine, alternately.

Each checkout runs in its own worker process (its folder first on sys.path) with its engine loaded once; the
driver sends every prompt to A, then B, then B, then A (and so on), so drift of the machine falls on both alike.
Reports output tokens/s per checkout and configuration, the ratio B/A, and whether the tokens are identical.

    python scripts/bench_ab_trees.py --a /path/to/base-checkout --b . --prompts data/humaneval.jsonl --limit 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
try:
    from sampling.params import SamplingParams
except ImportError:
    from engine.sampling_params import SamplingParams
from engine.llm_engine import LLMEngine
engines = {}
for line in sys.stdin:
    job = json.loads(line)
    key = json.dumps(job["config"], sort_keys=True)
    if key not in engines:
        engines[key] = LLMEngine(**job["config"])
        engines[key].generate([job["prompts"][0]], SamplingParams(max_tokens=4))  # warm-up
    engine = engines[key]
    t0 = time.perf_counter()
    outs = engine.generate(job["prompts"], SamplingParams(max_tokens=job["max_tokens"], temperature=0))
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "tokens": [o.output_token_ids for o in outs]}), flush=True)
"""


class Worker:
    def __init__(self, tree: Path):
        env_path = str(tree.resolve())
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=env_path,
            env={**os.environ, "PYTHONPATH": env_path},
        )

    def run(self, config: dict, prompts: list, max_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"config": config, "prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("worker exited")
        return json.loads(line)


def load(path: str, limit: int) -> list:
    out = []
    for line in Path(path).read_text().splitlines()[:limit]:
        rec = json.loads(line)
        out.append(rec.get("messages") or rec.get("prompt") or [{"role": "user", "content": rec["turns"][0]}])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="the base checkout")
    ap.add_argument("--b", required=True, help="the changed checkout")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--speculators", default="none,ngram")
    ap.add_argument("--batch", type=int, default=0, help="also run all prompts at once (0 = only one by one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    prompts = load(args.prompts, args.limit)
    workers = {"a": Worker(Path(args.a)), "b": Worker(Path(args.b))}
    report: dict = {"a": str(Path(args.a).resolve()), "b": str(Path(args.b).resolve()), "configs": {}}
    for spec in args.speculators.split(","):
        config = {"speculator": spec, "kv_cache_gib": 0.5}
        jobs = [[p] for p in prompts] + ([prompts] if args.batch else [])
        wall = {"a": 0.0, "b": 0.0}
        tokens = {"a": 0, "b": 0}
        same = True
        for i, job in enumerate(jobs):
            order = ("a", "b") if i % 2 == 0 else ("b", "a")
            got = {w: workers[w].run(config, job, args.max_tokens) for w in order}
            for w in order:
                wall[w] += got[w]["wall_s"]
                tokens[w] += sum(len(t) for t in got[w]["tokens"])
            same &= got["a"]["tokens"] == got["b"]["tokens"]
        tps = {w: tokens[w] / wall[w] for w in wall}
        report["configs"][spec] = {
            "a_tokens_per_s": round(tps["a"], 2),
            "b_tokens_per_s": round(tps["b"], 2),
            "ratio_b_over_a": round(tps["b"] / tps["a"], 3),
            "identical_tokens": same,
        }
        print(json.dumps({spec: report["configs"][spec]}), flush=True)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
