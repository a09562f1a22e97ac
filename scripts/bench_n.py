"""n sequences of one request against as many separate requests of the same prompt, on the default model.

Both sample `n` sequences of `--max-tokens` from one HumanEval prompt (seeded, EOS ignored, so both produce the
same number of tokens); the request with n shares the prompt's KV blocks. Runs alternate between the two ways
(`--rounds` each) on one engine. Prints JSON: output tokens per second (median over rounds), the most KV blocks
live at once and the prompt tokens the model computed, for each way.

    .venv/bin/python scripts/bench_n.py --n 4 --max-tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

from engine.llm_engine import LLMEngine
from sampling.params import SamplingParams

HUMANEVAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "humaneval.jsonl.gz"


def run_once(engine: LLMEngine, prompt: list[int], params: SamplingParams, grouped: bool, tag: str) -> dict:
    """One run: a request with n sequences, or n requests of one sequence each."""
    bm = engine.block_manager.bm
    computed = engine.scheduler.num_prefix_queried_tokens - engine.scheduler.num_prefix_hit_tokens
    start = time.perf_counter()
    if grouped:
        engine.add_request(prompt, params, request_id=tag)
    else:
        one = params.model_copy(update={"n": 1})
        for i in range(params.n):
            engine.add_request(prompt, one.model_copy(update={"seed": params.seed + i}), request_id=f"{tag}-{i}")
    tokens, peak = 0, 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.new_token_ids)
        peak = max(peak, bm.num_blocks - 1 - bm.num_free_blocks)
    seconds = time.perf_counter() - start
    now = engine.scheduler.num_prefix_queried_tokens - engine.scheduler.num_prefix_hit_tokens
    return {"tokens": tokens, "seconds": seconds, "peak_blocks": peak, "prompt_tokens_computed": now - computed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-index", type=int, default=0)
    args = ap.parse_args()
    engine = LLMEngine(max_model_len=1024, kv_cache_gib=0.1, enable_prefix_caching=False)
    with gzip.open(HUMANEVAL, "rt") as f:
        text = [json.loads(line)["prompt"] for line in f][args.prompt_index]
    prompt = engine.tokenizer(text)["input_ids"]
    params = SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=0.8, seed=1, ignore_eos=True)
    run_once(engine, prompt, params, True, "warm")
    runs: dict[str, list[dict]] = {"one_request_n": [], "separate": []}
    for r in range(args.rounds):
        order = ["one_request_n", "separate"] if r % 2 == 0 else ["separate", "one_request_n"]
        for way in order:
            runs[way].append(run_once(engine, prompt, params, way == "one_request_n", f"{way}-{r}"))
    result = {
        "n": args.n,
        "max_tokens": args.max_tokens,
        "prompt_tokens": len(prompt),
        "block_size": engine.config.block_size,
        "prefix_caching": False,
    }
    for way, rs in runs.items():
        result[way] = {
            "output_tokens_per_s": round(statistics.median(x["tokens"] / x["seconds"] for x in rs), 1),
            "peak_kv_blocks": max(x["peak_blocks"] for x in rs),
            "prompt_tokens_computed": rs[0]["prompt_tokens_computed"],
            "output_tokens": rs[0]["tokens"],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
