"""Time the scheduler with its block manager per decode step, without a model; prints one JSON object.

    .venv/bin/python scripts/bench_block_protocol.py [--steps 300] [--forward-ms 2] [--json OUT.json]
    .venv/bin/python scripts/bench_block_protocol.py --baseline-tree /tmp/old [--rounds 2]

Each case runs `--steps` decode steps of `batch` sequences (a 100-token prompt each, prefilled before the
timing starts) with the block manager in this process (`local`) or in its actor (`actor`), plain decoding
(k = 0) or with 4 lookahead slots of which one draft is accepted a step (k = 4). Only `schedule()` and the
commits are timed; between them the thread sleeps `--forward-ms`, as if the model ran, so work the block
manager does off the critical path stays off it. Figures are microseconds per step (median of 5 slices).

With `--baseline-tree` (a copy of an older checkout, e.g. `git archive REV | tar -x -C /tmp/old`) the same
cases run alternately against that tree and this one, A-B-B-A per pair of rounds, each in a fresh process with
its own Ray, and the report adds the ratios of this tree to the baseline (below 1: faster now).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [(where, batch, k) for where in ("local", "actor") for batch in (1, 16) for k in (0, 4)]
BLOCK_SIZE = 16
PROMPT = 100


def run_case(make_service, batch: int, k: int, steps: int, forward_s: float) -> float:
    """Microseconds of schedule() + commits per decode step."""
    from engine.scheduler import Scheduler
    from engine.sequence import Sequence
    from sampling.params import SamplingParams

    num_blocks = 1 + batch * -(-(PROMPT + 2 * (steps + 50) + k) // BLOCK_SIZE)
    service = make_service(num_blocks)
    sched = Scheduler(service, num_blocks, BLOCK_SIZE, batch, 4096, 1 << 20)
    seqs = []
    for i in range(batch):
        prompt = [(i * 7919 + j) % 30000 for j in range(PROMPT)]
        s = Sequence(i, str(i), prompt, PROMPT, SamplingParams(max_tokens=1 << 20, ignore_eos=True), float(i))
        s.spec_k = k
        sched.add(s)
        seqs.append(s)
    times = []
    for step in range(steps + 20):  # the first 20 steps (prefill, warm-up) are not timed
        start = time.perf_counter()
        out = sched.schedule()
        spent = time.perf_counter() - start
        for item in out.scheduled:
            sched.tables[item.seq.seq_id]  # the engine reads each table for the forward
        time.sleep(forward_s)
        start = time.perf_counter()
        for item in out.scheduled:
            s = item.seq
            s.num_computed += item.num_tokens
            if item.completes_prefill:
                accepted = min(1, item.num_lookahead)
                s.token_ids.extend([step % 30000] * (1 + accepted))
                s.num_computed += accepted
            sched.commit(s)
        spent += time.perf_counter() - start
        if step >= 20:
            times.append(spent)
    for s in seqs:
        sched.finish(s)
    if hasattr(sched, "flush"):  # older trees send the last frees on an explicit flush
        sched.flush()
    shutdown = getattr(service, "shutdown", None)
    if shutdown:
        shutdown()
    slices = [times[i::5] for i in range(5)]
    return 1e6 * statistics.median(statistics.fmean(s) for s in slices)


def measure(steps: int, forward_s: float) -> dict[str, float]:
    """Every case against the tree on sys.path (this process's PYTHONPATH decides which)."""
    import ray

    from deployments.block_manager_actor import RemoteBlockManager
    from kv_cache.block_batch import BatchedBlockManager

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        makers = {
            "local": lambda n: BatchedBlockManager(n, BLOCK_SIZE, True),
            "actor": lambda n: RemoteBlockManager(n, BLOCK_SIZE, True),
        }
        return {f"{w}/batch{b}/k{k}": round(run_case(makers[w], b, k, steps, forward_s), 1) for w, b, k in CASES}
    finally:
        ray.shutdown()


def measure_in_subprocess(tree: Path, steps: int, forward_ms: float) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", f"--steps={steps}", f"--forward-ms={forward_ms}"]
    out = subprocess.run(cmd, env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--forward-ms", type=float, default=2.0)
    p.add_argument("--baseline-tree", type=Path, help="an older checkout to compare with, A-B-B-A")
    p.add_argument("--rounds", type=int, default=2, help="pairs of A-B-B-A rounds against the baseline")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one run, in this process
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.steps, args.forward_ms / 1e3)))
        return
    if args.baseline_tree is None:
        report = {"us_per_step": measure_in_subprocess(REPO, args.steps, args.forward_ms)}
    else:
        runs: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
        for _ in range(args.rounds):
            for name in ("baseline", "current", "current", "baseline"):
                tree = args.baseline_tree if name == "baseline" else REPO
                runs[name].append(measure_in_subprocess(tree, args.steps, args.forward_ms))
        med = {name: {c: statistics.median(r[c] for r in rs) for c in rs[0]} for name, rs in runs.items()}
        report = {
            "us_per_step": med,
            "ratio_current_to_baseline": {c: round(med["current"][c] / med["baseline"][c], 3) for c in med["current"]},
            "runs": runs,
        }
    report["settings"] = {"steps": args.steps, "forward_ms": args.forward_ms, "block_size": BLOCK_SIZE}
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
