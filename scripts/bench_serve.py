"""The serving path (Ray Serve over HTTP) against the in-process engine, side by side; prints one JSON object.

    .venv/bin/python scripts/bench_serve.py [--humaneval-limit 6] [--max-tokens 64] [--cpus 2] [--out F.json]

On a `ray start --head` cluster this script starts itself, `serve deploy` of serve_config.yaml with one
replica (completion cache off, so that every request reaches the engine, and the replica given `--cpus`
CPUs, the same torch threads as the in-process engine):
- the time from `serve deploy` to the first streamed token;
- batch 1, HumanEval chat prompts one after another: streamed over HTTP vs the in-process engine, the two
  alternating prompt by prompt (so that the machine's drifting speed hits both alike);
- 16 ShareGPT prompts in flight: 16 concurrent HTTP streams vs the in-process engine with 16 in flight;
- n-gram speculation on vs off over HTTP, 16 streams (a second deploy with the speculator off).
Greedy everywhere, so both paths must produce the same tokens; the report counts how many texts match.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import platform
import tempfile
import time
from pathlib import Path

import httpx
import torch
import yaml

from cli.bench import print_report, run_specserve, standard_prompt_sets
from cli.prompts import PromptSpec
from cluster.local_cluster import REPO, LocalCluster
from cluster.sse_client import stream_completion
from engine.llm_engine import LLMEngine
from engine.tokenization import encode_prompt
from model.config import EngineConfig
from sampling.params import SamplingParams

MODEL = "SmolLM2-135M-Instruct"


def app_config(cpus: int, speculator: str, k: int) -> dict:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    args["engine"].update(speculator=speculator, num_speculative_tokens=k)
    args["ingress"]["completion_cache"]["enabled"] = False
    target = args["target"]
    del target["autoscaling_config"]
    target["num_replicas"] = 1
    target["shard_resources"]["num_cpus"] = cpus
    return config


async def stream_one(client: httpx.AsyncClient, url: str, spec: PromptSpec, max_tokens: int) -> dict:
    """One streamed request; its text, completion tokens (from `usage`) and time to first token."""
    common = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    common["stream_options"] = {"include_usage": True}
    if spec.messages is not None:
        path, body = "/v1/chat/completions", {**common, "messages": spec.messages}
    else:
        path, body = "/v1/completions", {**common, "prompt": spec.prompt}
    return await stream_completion(client, url, path, body)


async def run_http(url: str, specs: list[PromptSpec], max_tokens: int, concurrency: int) -> dict:
    """Keep `concurrency` streams in flight over the prompts, in order; output tokens/s over the whole run."""
    results: list[dict | None] = [None] * len(specs)
    next_i = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < len(specs):
            i, next_i = next_i, next_i + 1
            results[i] = await stream_one(client, url, specs[i], max_tokens)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        await stream_one(client, url, specs[0], 2)  # warm-up, as the in-process run gets
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 3),
        "texts": [r["text"] for r in results],
    }


def run_b1_alternating(url: str, specs: list[PromptSpec], config: EngineConfig, max_tokens: int) -> tuple[dict, dict]:
    """Each prompt streamed over HTTP, then run by an in-process engine (the replica idles meanwhile)."""
    engine = LLMEngine(config)
    params = SamplingParams(max_tokens=max_tokens)
    encoded = [encode_prompt(engine.tokenizer, engine.arch.vocab_size, s.prompt, s.messages) for s in specs]
    engine.generate([encoded[0]], SamplingParams(max_tokens=2))  # warm-up, as the HTTP path gets
    http = {"output_tokens": 0, "wall_s": 0.0, "texts": []}
    local = {"output_tokens": 0, "wall_s": 0.0, "texts": []}

    async def alternate() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            await stream_one(client, url, specs[0], 2)  # warm-up
            for spec, ids in zip(specs, encoded):
                start = time.perf_counter()
                r = await stream_one(client, url, spec, max_tokens)
                http["wall_s"] += time.perf_counter() - start
                http["output_tokens"] += r["tokens"]
                http["texts"].append(r["text"])
                start = time.perf_counter()
                (out,) = engine.generate([ids], params)  # blocks the loop: nothing else runs meanwhile
                local["wall_s"] += time.perf_counter() - start
                local["output_tokens"] += len(out.output_token_ids)
                local["texts"].append(out.text)

    asyncio.run(alternate())
    for r in (http, local):
        r["wall_s"] = round(r["wall_s"], 3)
        r["output_tokens_per_s"] = round(r["output_tokens"] / r["wall_s"], 3)
    return http, local


def run_local(specs: list[PromptSpec], config: EngineConfig, max_tokens: int, concurrency: int) -> dict:
    s = run_specserve(specs, config, max_tokens, concurrency).to_json({})
    return {
        **{k: s["summary"][k] for k in ("output_tokens", "wall_s", "output_tokens_per_s")},
        "texts": [r["text"] for r in s["requests"]],
    }


def deploy_and_wait(cluster: LocalCluster, config: dict, path: Path, probe: PromptSpec, timeout_s: float) -> float:
    """Seconds from `serve deploy` until a streamed token comes back."""
    start = time.perf_counter()
    cluster.deploy(config, path)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            asyncio.run(run_http(cluster.url, [probe], 1, 1))
            return time.perf_counter() - start
        except (httpx.HTTPError, RuntimeError):
            time.sleep(0.5)
    raise TimeoutError(f"no token within {timeout_s} s of serve deploy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--humaneval", default=str(REPO.parent / "shared" / "data" / "humaneval.jsonl.gz"))
    ap.add_argument("--humaneval-limit", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=torch.get_num_threads(), help="CPUs (torch threads) per engine")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.cpus)
    humaneval, sharegpt = standard_prompt_sets(args.humaneval, args.humaneval_limit, args.concurrency, REPO / "data")
    n, c = args.max_tokens, args.concurrency
    on = app_config(args.cpus, "ngram", args.k)
    engine_on = EngineConfig(**on["applications"][0]["args"]["engine"])
    runs: dict[str, dict] = {}
    t0 = time.time()
    cluster = LocalCluster(num_cpus=args.cpus + 2)
    tmp = Path(tempfile.mkdtemp())
    try:
        cluster.wait_ready()
        deploy_s = deploy_and_wait(cluster, on, tmp / "on.yaml", humaneval[0], 600)
        runs["http_ngram_b1"], runs["local_ngram_b1"] = run_b1_alternating(cluster.url, humaneval, engine_on, n)
        runs[f"http_ngram_c{c}"] = asyncio.run(run_http(cluster.url, sharegpt, n, c))
        runs[f"local_ngram_c{c}"] = run_local(sharegpt, engine_on, n, c)
        off = copy.deepcopy(on)
        off["applications"][0]["args"]["engine"]["speculator"] = "none"
        cluster.serve("shutdown", "-y")  # a redeploy would answer from the old replica while replacing it
        redeploy_s = deploy_and_wait(cluster, off, tmp / "off.yaml", humaneval[0], 600)
        runs[f"http_plain_c{c}"] = asyncio.run(run_http(cluster.url, sharegpt, n, c))
    finally:
        cluster.stop()

    def tps(key: str) -> float:
        return runs[key]["output_tokens_per_s"]

    def same(a: str, b: str) -> str:
        return f"{sum(x == y for x, y in zip(runs[a]['texts'], runs[b]['texts']))}/{len(runs[a]['texts'])}"

    report = {
        "machine": {"cpus": args.cpus, "platform": platform.platform(), "torch": torch.__version__},
        "settings": vars(args),
        "serve_deploy_to_first_token_s": round(deploy_s, 1),
        "second_deploy_to_first_token_s": round(redeploy_s, 1),
        "ratios": {
            "http_vs_local_b1 (goal >= 0.85)": round(tps("http_ngram_b1") / tps("local_ngram_b1"), 3),
            f"http_vs_local_c{c} (goal >= 0.8)": round(tps(f"http_ngram_c{c}") / tps(f"local_ngram_c{c}"), 3),
            f"http_spec_on_vs_off_c{c} (goal >= 1)": round(tps(f"http_ngram_c{c}") / tps(f"http_plain_c{c}"), 3),
        },
        "same_text_http_vs_local": {
            "b1": same("http_ngram_b1", "local_ngram_b1"),
            f"c{c}": same(f"http_ngram_c{c}", f"local_ngram_c{c}"),
        },
        "runs": {k: {x: v for x, v in r.items() if x != "texts"} for k, r in runs.items()},
        "total_s": round(time.time() - t0, 1),
    }
    print_report(report, args.out)


if __name__ == "__main__":
    main()
