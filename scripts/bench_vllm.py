"""specserve against vLLM's CPU build on the same prompts and token ids; prints one JSON object.

    .venv/bin/python scripts/bench_vllm.py --vllm-python VENV/bin/python [--humaneval-limit 10]
        [--max-tokens 128] [--concurrency 32] [--max-prompt-tokens 256] [--out results/vllm.json]

vLLM runs in its own environment (`scripts/vllm_worker.py`, its offline `LLM` engine on the float32 folder
of the default model, greedy); specserve runs in this process with its default engine settings (packed
weights when the model file is quantized). Both get the same prompt token ids and stop tokens.

- batch 1, HumanEval chat prompts: specserve packed, specserve fp32 and vLLM, alternating prompt by prompt;
- `--concurrency` short ShareGPT prompts (chat prompt at most `--max-prompt-tokens`) all in flight at once,
  as A-B-B-A: specserve, vLLM, vLLM, specserve. Each engine's second pass finds the prompts its first pass
  cached (both cache prefixes by default); `--no-prefix-caching` turns that off in both.

Only one engine runs at a time (the other waits idle), so the two never share the cores: vLLM's processes keep
a core busy for about a second after each job, so every run first waits until the machine's cores are idle
(`quiet_cores`; the seconds waited are in the report). vLLM gets all of
them for its compute threads (VLLM_CPU_OMP_THREADS_BIND=0-<cpus-1>, VLLM_CPU_NUM_OF_RESERVED_CPU=0; by
default it keeps one core for its front end, which on 2 cores leaves one compute thread) and a 2 GiB KV cache;
set those variables to override.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from cli.bench import (
    BenchResult,
    print_report,
    run_alternating,
    run_specserve,
    short_prompts,
    standard_prompt_sets,
    warm,
)
from cli.prompts import PromptSpec
from engine.llm_engine import LLMEngine
from engine.tokenization import encode_prompt
from model.config import EngineConfig
from model.loader import eos_token_ids, resolve_model

REPO = Path(__file__).resolve().parents[1]


class VLLMWorker:
    """`scripts/vllm_worker.py` in vLLM's environment, one job at a time over stdin/stdout."""

    def __init__(self, python: str, folder: Path, stop_token_ids: list[int], prefix_caching: bool = True):
        self.stop = stop_token_ids
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self.proc = subprocess.Popen(
            [python, str(REPO / "scripts" / "vllm_worker.py"), str(folder)]
            + ([] if prefix_caching else ["--no-prefix-caching"]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._read()  # {"ready": true} once the engine is loaded and warm

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the vLLM worker exited with code {self.proc.wait()}")

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens, "stop_token_ids": self.stop}))
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def vllm_runner(worker: VLLMWorker, encode, max_tokens: int):
    def run(specs: list[PromptSpec]) -> BenchResult:
        ids = [encode(s) for s in specs]
        out = worker.run(ids, max_tokens)
        result = BenchResult(wall_s=out["wall_s"])
        for spec, p, o in zip(specs, ids, out["outputs"]):
            result.requests.append(
                {
                    "id": spec.id,
                    "prompt_token_ids": p,
                    "output_token_ids": o,
                    "ttft_s": None,
                    "drafted": 0,
                    "accepted": 0,
                }  # fmt: skip
            )
        return result

    return run


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def quiet_cores(max_busy: float = 0.1, window_s: float = 0.1, timeout_s: float = 10.0) -> float:
    """Waits until at most `max_busy` of the machine's cores were busy over a `window_s` window (or `timeout_s`
    passed); returns the seconds waited."""
    start = time.perf_counter()
    busy, total = cpu_times()
    while time.perf_counter() - start < timeout_s:
        time.sleep(window_s)
        b, t = cpu_times()
        if t > total and (b - busy) / (t - total) <= max_busy:
            break
        busy, total = b, t
    return time.perf_counter() - start


def settled(run, waits: list[float]):
    """`run` started on quiet cores only; the seconds each start waited are appended to `waits`."""

    def start(*args):
        waits.append(quiet_cores())
        return run(*args)

    return start


def tps(result: BenchResult) -> float:
    return result.to_json({})["summary"]["output_tokens_per_s"]


def same(a: BenchResult, b: BenchResult) -> int:
    return sum(x["output_token_ids"] == y["output_token_ids"] for x, y in zip(a.requests, b.requests))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", required=True, help="the python of an environment with vllm-cpu")
    ap.add_argument("--humaneval", default=str(REPO.parent / "shared" / "data" / "humaneval.jsonl.gz"))
    ap.add_argument("--humaneval-limit", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="both engines without prefix caching (the A-B-B-A's second pass of each then recomputes the prompts "
        "its first pass cached)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n, c = args.max_tokens, args.concurrency
    t0 = time.time()
    cache = not args.no_prefix_caching
    packed = warm(LLMEngine(EngineConfig(enable_prefix_caching=cache)))
    fp32 = warm(LLMEngine(EngineConfig(weights="fp32", enable_prefix_caching=cache)))
    tok, vocab = packed.tokenizer, packed.arch.vocab_size
    humaneval, pool = standard_prompt_sets(args.humaneval, args.humaneval_limit, 8 * c, REPO / "data")
    short = short_prompts(pool, tok, vocab, args.max_prompt_tokens, c)
    folder = resolve_model(None)
    worker = VLLMWorker(args.vllm_python, folder, sorted(eos_token_ids(folder, tok)), prefix_caching=cache)
    waits: list[float] = []
    vllm = settled(vllm_runner(worker, lambda s: encode_prompt(tok, vocab, s.prompt, s.messages), n), waits)

    def specserve(engine: LLMEngine):
        def run(specs: list[PromptSpec], concurrency: int = 1) -> BenchResult:
            return run_specserve(specs, engine.config, n, concurrency, engine=engine, warm_up=False)

        return settled(run, waits)

    ours = {"specserve_packed": specserve(packed), "specserve_fp32": specserve(fp32)}
    try:
        b1 = run_alternating({**ours, "vllm": vllm}, humaneval)
        abba = [
            ("specserve", lambda: ours["specserve_packed"](short, c)),
            ("vllm", lambda: vllm(short)),
            ("vllm", lambda: vllm(short)),
            ("specserve", lambda: ours["specserve_packed"](short, c)),
        ]
        cc: dict[str, list[BenchResult]] = {"specserve": [], "vllm": []}
        for name, run in abba:
            cc[name].append(run())
    finally:
        worker.close()
    rate = {name: sum(tps(r) for r in rs) / len(rs) for name, rs in cc.items()}
    report = {
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": vars(args),
        "ratios": {
            "packed_b1_vs_vllm": round(tps(b1["specserve_packed"]) / tps(b1["vllm"]), 3),
            "fp32_b1_vs_vllm": round(tps(b1["specserve_fp32"]) / tps(b1["vllm"]), 3),
            "packed_b1_vs_fp32 (goal >= 2)": round(tps(b1["specserve_packed"]) / tps(b1["specserve_fp32"]), 3),
            f"c{c}_vs_vllm": round(rate["specserve"] / rate["vllm"], 3),
        },
        "identical_outputs": {
            "b1_packed_vs_vllm": same(b1["specserve_packed"], b1["vllm"]),
            "b1_fp32_vs_vllm": same(b1["specserve_fp32"], b1["vllm"]),
            "of_b1": len(humaneval),
            f"c{c}": same(cc["specserve"][0], cc["vllm"][0]),
            f"of_c{c}": len(short),
        },
        "b1_tokens_per_s": {k: tps(v) for k, v in b1.items()},
        f"c{c}_tokens_per_s": {k: [tps(r) for r in rs] for k, rs in cc.items()},
        f"c{c}_prompt_tokens": sum(len(r["prompt_token_ids"]) for r in cc["vllm"][0].requests),
        "quiet_cores_wait_s": {"mean": round(sum(waits) / len(waits), 2), "max": round(max(waits), 2)},
        "total_s": round(time.time() - t0, 1),
    }
    print_report(report, args.out)


if __name__ == "__main__":
    main()
