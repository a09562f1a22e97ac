"""Where a batch-1 decode step of the in-process engine goes; prints one JSON object.

    .venv/bin/python scripts/profile_decode.py [--context 150] [--steps 20] [--speculator none] [--no-cpu-kernels]

Times plain decode steps of one sequence after a `--context`-token prompt (ms_per_step), then the model's
linear layers alone on one row, through the same matmul path the engine uses (matmul_ms_per_step; each
weight is read once a step, which gives the weights' read rate), and lists the other ops that take the most
time under torch.profiler (the profiler slows small ops, so read those as shares). With the CPU kernels on
(the default) the matmuls are a C++ call the profiler does not see; `--no-cpu-kernels` shows the PyTorch
paths (oneDNN matmuls, gathered-page attention). ms_per_step_from_a_second_thread steps the same engine
from a new thread after this one has run torch work: the situation AsyncEngine avoids by building its engine
on its loop thread (two OpenMP thread teams then contend for the cores).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cli.bench import print_report
from engine.llm_engine import LLMEngine
from model.config import EngineConfig
from model.parallel import ColumnParallelLinear, RowParallelLinear
from sampling.params import SamplingParams

MATMUL_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear", "aten::matmul")


def decode_steps(engine: LLMEngine, prompt: list[int], steps: int) -> float:
    """Seconds per decode step over `steps` steps (prefill excluded)."""
    engine.add_request(prompt, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    engine.step()  # prefill
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return (time.perf_counter() - start) / steps


def matmul_seconds(engine: LLMEngine, repeats: int = 10) -> float:
    """Seconds to run every linear layer of the model once on one row (the best of `repeats`)."""
    model = engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    inputs = {m: torch.randn(1, m.weight.shape[1]) for m in linears}
    hidden = torch.randn(1, model.arch.hidden_size)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for m in linears:
                m(inputs[m])
            model.logits(hidden)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=150)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--speculator", default="none", choices=["none", "ngram"])
    ap.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(speculator=args.speculator, cpu_kernels=args.cpu_kernels))
    prompt = [(i * 7919) % 1000 + 100 for i in range(args.context)]
    decode_steps(engine, prompt[:8], 4)  # warm-up
    unprofiled = min(decode_steps(engine, prompt, args.steps) for _ in range(3))
    matmul = matmul_seconds(engine)
    from_thread: list[float] = []
    worker = threading.Thread(
        target=lambda: from_thread.extend(decode_steps(engine, prompt, args.steps) for _ in range(3))
    )
    worker.start()
    worker.join()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_steps(engine, prompt, args.steps)
    ops = {e.key: e.self_cpu_time_total / 1e3 / args.steps for e in prof.key_averages()}
    others = {op: ms for op, ms in ops.items() if op not in MATMUL_OPS}
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters() if p.dim() == 2)
    print_report(
        {
            "settings": vars(args) | {"threads": torch.get_num_threads()},
            "ms_per_step": round(unprofiled * 1e3, 2),
            "ms_per_step_from_a_second_thread": round(min(from_thread) * 1e3, 2),
            "matmul_ms_per_step": round(matmul * 1e3, 2),
            "matmul_share": round(matmul / unprofiled, 3),
            "matmul_weights_gb_per_s": round(weight_bytes / matmul / 1e9, 2),  # each weight read once a step
            "top_other_ops_ms_per_step_profiled": {
                op: round(ms, 3) for op, ms in sorted(others.items(), key=lambda x: -x[1])[:12]
            },
        },
        None,
    )


if __name__ == "__main__":
    main()
