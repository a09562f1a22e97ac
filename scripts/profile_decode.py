"""Where a batch-1 decode step of the in-process engine goes; prints one JSON object.

    .venv/bin/python scripts/profile_decode.py [--context 150] [--steps 20] [--speculator none]

Times plain decode steps of one sequence after a `--context`-token prompt, then profiles the same steps with
torch.profiler and splits the profiled time into the matmuls (oneDNN / aten linear ops) and everything else
(norms, RoPE, attention, small ops, Python in between). The profiler itself slows the small ops, so read
the split as shares, and ms_per_step (unprofiled) as the time. ms_per_step_from_a_second_thread steps the
same engine from a new thread after this one has run torch work: the situation AsyncEngine avoids by
building its engine on its loop thread (two OpenMP thread teams then contend for the cores).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from torch.profiler import ProfilerActivity, profile

from engine.bench import print_report
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

MATMUL_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear", "aten::matmul")


def decode_steps(engine: LLMEngine, prompt: list[int], steps: int) -> float:
    """Seconds per decode step over `steps` steps (prefill excluded)."""
    engine.add_request(prompt, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    engine.step()  # prefill
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=150)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--speculator", default="none", choices=["none", "ngram"])
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(speculator=args.speculator))
    prompt = [(i * 7919) % 1000 + 100 for i in range(args.context)]
    decode_steps(engine, prompt[:8], 4)  # warm-up
    unprofiled = min(decode_steps(engine, prompt, args.steps) for _ in range(3))
    from_thread: list[float] = []
    worker = threading.Thread(
        target=lambda: from_thread.extend(decode_steps(engine, prompt, args.steps) for _ in range(3))
    )
    worker.start()
    worker.join()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_steps(engine, prompt, args.steps)
    ops = {e.key: e.self_cpu_time_total / 1e3 / args.steps for e in prof.key_averages()}
    total = sum(ops.values())
    matmul = sum(ms for op, ms in ops.items() if op in MATMUL_OPS)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters() if p.dim() == 2)
    print_report(
        {
            "settings": vars(args) | {"threads": torch.get_num_threads()},
            "ms_per_step": round(unprofiled * 1e3, 2),
            "ms_per_step_from_a_second_thread": round(min(from_thread) * 1e3, 2),
            "profiled_ms_per_step": round(total, 2),
            "matmul_share": round(matmul / total, 3),
            "other_share": round(1 - matmul / total, 3),
            "matmul_weights_gb_per_s": round(weight_bytes / (matmul / 1e3) / 1e9, 2),  # each weight read once a step
            "top_ops_ms_per_step": {op: round(ms, 3) for op, ms in sorted(ops.items(), key=lambda x: -x[1])[:12]},
        },
        None,
    )


if __name__ == "__main__":
    main()
