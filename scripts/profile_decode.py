"""Where a decode step of the in-process engine goes; prints one JSON object.

    .venv/bin/python scripts/profile_decode.py [--context 150] [--steps 20] [--speculator none] [--no-cpu-kernels]
    .venv/bin/python scripts/profile_decode.py --concurrency 16,32,64 [--steps 20] [--weights auto]

Times plain decode steps of one sequence after a `--context`-token prompt (ms_per_step), then the model's
linear layers alone on one row, through the same matmul path the engine uses (matmul_ms_per_step; each
weight is read once a step, which gives the weights' read rate), and lists the other ops that take the most
time under torch.profiler, with the layers run from Python so that it sees their ops (the profiler slows
small ops, so read those as shares). With the CPU kernels on (the default) the matmuls are a C++ call the
profiler does not see; `--no-cpu-kernels` shows the PyTorch paths (oneDNN matmuls, gathered-page
attention). ms_per_step_from_a_second_thread steps the same engine from a new thread after this one has run
torch work: the situation AsyncEngine avoids by building its engine on its loop thread (two OpenMP thread
teams then contend for the cores).

`--concurrency` instead splits the decode steps of that many short prompts in flight (after all have
prefilled) by wall time: the linear layers (`project`, the LM head included), attention over the pages and its
metadata, the model's other ops (norms, RoPE, activations, embedding), the runner's input building, sampling
and verification (`_postprocess`), scheduling and proposing, and what is left of the step (Python glue). The
engine runs the layers of such steps as one C++ call (`model/csrc/decoder_stack.cpp`), which no Python timer
can split: the split (`layers_from_python`) runs them layer by layer from Python, and `ms_per_step` /
`tokens_per_s` time the same steps as the engine runs them, in alternation with the split's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts.roofline, run as a script

import model.parallel as parallel  # noqa: E402
from cli.bench import print_report  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from model.config import EngineConfig  # noqa: E402
from model.parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from sampling.params import SamplingParams  # noqa: E402
from scripts.roofline import weight_bytes  # noqa: E402

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


class Timers:
    """Wall time spent inside wrapped callables, by name (wrappers removed by `restore`)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list = []

    def wrap(self, owner, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        had_own = attr in vars(owner)  # an instance attribute (or module global) to put back, else delete
        self._undo.append((owner, attr, inner if had_own else None))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, inner in reversed(self._undo):
            if inner is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, inner)
        self._undo.clear()


@contextlib.contextmanager
def layers_from_python(engine: LLMEngine):
    """Runs the decoder layers one by one from Python (no C++ decoder stack), where timers and the profiler see
    each op."""
    model = engine.runner.model
    kernels, model.stack_kernels = model.stack_kernels, None
    try:
        yield
    finally:
        model.stack_kernels = kernels


def step_breakdown(engine: LLMEngine, concurrency: int, steps: int) -> dict:
    """ms per decode step with `concurrency` short prompts in flight, as the engine runs them, and split by part
    with the layers run from Python; the two alternate (A-B-B-A)."""
    stacked, split = [], []
    for use_stack in (True, False, False, True):
        if use_stack:
            stacked.append(timed_steps(engine, concurrency, steps, split=False))
        else:
            with layers_from_python(engine):
                split.append(timed_steps(engine, concurrency, steps, split=True))
    step_s = sum(r["seconds"] for r in stacked)
    parts = {k: sum(r["ms"][k] for r in split) / len(split) for k in split[0]["ms"]}
    split_ms = sum(r["seconds"] for r in split) / (len(split) * steps) * 1e3
    return {
        "ms_per_step": round(step_s / (len(stacked) * steps) * 1e3, 2),
        "tokens_per_s": round(sum(r["tokens"] for r in stacked) / step_s, 1),
        "layers_from_python": {
            "ms_per_step": round(split_ms, 2),
            "ms": {k: round(v, 2) for k, v in parts.items()},
            "share": {k: round(v / split_ms, 3) for k, v in parts.items()},
        },
    }


def timed_steps(engine: LLMEngine, concurrency: int, steps: int, split: bool, prompt_len: int = 24) -> dict:
    """`steps` decode steps of `concurrency` short prompts in flight (all prefilled first): seconds, tokens, and
    with `split` the ms a step by part."""
    for i in range(concurrency):
        prompt = [(i * 131 + j * 7919) % 5000 + 100 for j in range(prompt_len)]
        engine.add_request(prompt, SamplingParams(max_tokens=steps + 4, ignore_eos=True))
    while any(r.seq.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()  # prefill (chunks of max_num_batched_tokens) until every sequence has its first token
    engine.step()
    runner = engine.runner
    timers = Timers()
    if split:
        timers.wrap(parallel, "project", "matmul")
        timers.wrap(runner.backend, "forward", "attention")
        timers.wrap(runner.backend, "prepare", "attention_metadata")
        timers.wrap(runner.model, "forward", "model")
        timers.wrap(runner.model, "logits", "logits")
        timers.wrap(runner, "execute_with_hidden", "runner")
        timers.wrap(engine, "_postprocess", "sampling_verification")
        timers.wrap(engine.scheduler, "schedule", "schedule")
        timers.wrap(engine, "_propose", "propose")
    tokens = 0
    start = time.perf_counter()
    try:
        for _ in range(steps):
            tokens += sum(len(o.new_token_ids) for o in engine.step())
    finally:
        total = time.perf_counter() - start
        timers.restore()
    while engine.has_unfinished():
        engine.step()
    if not split:
        return {"seconds": total, "tokens": tokens}
    t = {k: v / steps * 1e3 for k, v in timers.seconds.items()}
    parts = {
        "matmul": t["matmul"],
        "attention": t["attention"],
        "attention_metadata": t["attention_metadata"],
        "other_model_ops": t["model"] - (t["matmul"] - t["logits"]) - t["attention"],  # the LM head is outside
        "runner_inputs": t["runner"] - t["model"] - t["logits"] - t["attention_metadata"],
        "sampling_verification": t["sampling_verification"],
        "schedule_propose": t["schedule"] + t["propose"],
    }
    parts["python_rest"] = total / steps * 1e3 - sum(parts.values())
    return {"seconds": total, "tokens": tokens, "ms": parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=150)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--speculator", default="none", choices=["none", "ngram"])
    ap.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false")
    ap.add_argument("--weights", default="auto", choices=["auto", "fp32", "packed"])
    ap.add_argument("--concurrency", default=None, help="comma-separated sequences in flight: the step breakdown")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()
    config = EngineConfig(
        speculator=args.speculator, cpu_kernels=args.cpu_kernels, weights=args.weights, kv_cache_gib=0.5
    )
    engine = LLMEngine(config)
    if args.concurrency:
        step_breakdown(engine, 4, 4)  # warm-up
        report = {"settings": vars(args) | {"threads": torch.get_num_threads()}}
        for n in (int(c) for c in args.concurrency.split(",")):
            report[f"concurrency_{n}"] = step_breakdown(engine, n, args.steps)
        print_report(report, args.json)
        return
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
    with layers_from_python(engine), profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_steps(engine, prompt, args.steps)
    ops = {e.key: e.self_cpu_time_total / 1e3 / args.steps for e in prof.key_averages()}
    others = {op: ms for op, ms in ops.items() if op not in MATMUL_OPS}
    print_report(
        {
            "settings": vars(args) | {"threads": torch.get_num_threads()},
            "ms_per_step": round(unprofiled * 1e3, 2),
            "ms_per_step_from_a_second_thread": round(min(from_thread) * 1e3, 2),
            "matmul_ms_per_step": round(matmul * 1e3, 2),
            "matmul_share": round(matmul / unprofiled, 3),
            "matmul_weights_gb_per_s": round(weight_bytes(engine) / matmul / 1e9, 2),  # each read once a step
            "top_other_ops_ms_per_step_profiled": {
                op: round(ms, 3) for op, ms in sorted(others.items(), key=lambda x: -x[1])[:12]
            },
        },
        None,
    )


if __name__ == "__main__":
    main()
