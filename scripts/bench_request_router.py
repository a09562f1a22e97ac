"""Our prefix-aware request router against Ray Serve LLM's PrefixCacheAffinityRouter, on 2 engine replicas.

The workload: a few long system prompts, each with many short questions, sent in a shuffled order by a few
concurrent clients, so that a router that keeps each system prompt on one replica turns its prefill into a
prefix-cache hit. Each phase deploys a fresh app (cold prefix caches, a fresh router) with one router, in the
order A-B-B-A so that the machine's drift hits both alike, and measures client-side TTFT and throughput;
the prefix-cache hit rate per replica comes from the app's own `/metrics` (engine counters by replica).

    python scripts/bench_request_router.py --out results/router.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.local_cluster import served_app  # noqa: E402
from cluster.sse_client import stream_completion  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
WORDS = (
    "customer order refund invoice shipping delay warehouse policy account password device battery screen "
    "network router billing plan upgrade contract support ticket escalation manager weekend holiday region "
    "language currency discount coupon loyalty points delivery address courier tracking damaged replacement "
    "warranty repair appointment technician software update backup restore privacy consent security audit"
).split()
TOPICS = ["an online shop", "a mobile phone carrier", "a bank", "a travel agency", "a software vendor", "a library"]
QUESTIONS = [
    "How do I get my money back?",
    "Where is my package?",
    "Can I change my address?",
    "What does the warranty cover?",
    "How do I reset my password?",
    "Is there a discount for students?",
    "Can I talk to a manager?",
    "Why was I charged twice?",
    "How long does a repair take?",
    "Do you deliver on weekends?",
    "How do I cancel my plan?",
    "What languages do you support?",
    "Can I pay in another currency?",
    "How do I back up my data?",
    "Who can see my data?",
    "What happens after an escalation?",
]


def system_prompt(topic: str, words: int, seed: int) -> str:
    """A long, distinct system prompt: a role line, then `words` rule words (about one token each)."""
    rng = random.Random(seed)
    rules = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(words // 12)]
    body = "\n".join(f"Rule {i + 1}: {r}." for i, r in enumerate(rules))
    return f"You are the support assistant of {topic}. Follow these rules.\n{body}"


def workload(num_prompts: int, per_prompt: int, words: int, seed: int) -> list[list[dict]]:
    systems = [system_prompt(TOPICS[i % len(TOPICS)], words, seed + i) for i in range(num_prompts)]
    requests = [
        [{"role": "system", "content": s}, {"role": "user", "content": QUESTIONS[q % len(QUESTIONS)]}]
        for s in systems
        for q in range(per_prompt)
    ]
    random.Random(seed).shuffle(requests)
    return requests


async def one_request(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> dict:
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return await stream_completion(client, url, "/v1/chat/completions", body)


async def run_load(url: str, requests: list[list[dict]], concurrency: int, max_tokens: int) -> tuple[list, float]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def go(messages):
            async with sem:
                return await one_request(client, url, messages, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(go(m) for m in requests))
        return results, time.perf_counter() - start


def engine_counters(url: str) -> dict[str, dict[str, float]]:
    """Per replica: prefix-cache queried/hit tokens and finished requests, from the app's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "ray_specserve_prefix_cache_queried_tokens_total": "queried",
        "ray_specserve_prefix_cache_hit_tokens_total": "hit",
        "ray_specserve_e2e_latency_seconds_count": "finished",
    }
    out: dict[str, dict[str, float]] = {}
    text = httpx.get(f"{url}/metrics", timeout=60).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted and s.labels.get("deployment") == "LLMServer":
                out.setdefault(s.labels["replica"], {}).setdefault(wanted[s.name], 0.0)
                out[s.labels["replica"]][wanted[s.name]] += s.value
    return out


def wait_for_counters(url: str, replicas: set[str], expected: int, timeout_s: float = 90) -> dict:
    """The counters of `replicas` once they count `expected` finished requests (Ray exports recorded metrics
    every few seconds; an earlier phase's replicas may still be in the export, hence the filter)."""
    deadline = time.time() + timeout_s
    while True:
        counters = {r: c for r, c in engine_counters(url).items() if r in replicas}
        if sum(c.get("finished", 0) for c in counters.values()) >= expected or time.time() > deadline:
            return counters
        time.sleep(2)


def wait_for_replicas(n: int, timeout_s: float = 300) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        app = serve.status().applications.get("specserve")
        states = app.deployments["LLMServer"].replica_states if app and "LLMServer" in app.deployments else {}
        if states.get("RUNNING", 0) >= n:
            return
        time.sleep(1)
    raise TimeoutError(f"{n} replicas did not start")


def phase(router: str, args: argparse.Namespace, requests: list[list[dict]]) -> dict:
    app_args = {
        "engine": {"speculator": "none", "kv_cache_gib": args.kv_cache_gib, "max_model_len": 2048},
        "target": {"num_replicas": 2, "shard_resources": {"num_cpus": 1}, "max_ongoing_requests": 16},
        "ingress": {
            "completion_cache": {"enabled": False},
            "prefix_affinity": {"router": router, "stats_period_s": 1.0},
        },
    }
    with served_app(app_args) as url:
        wait_for_replicas(2)
        warm = [[{"role": "user", "content": f"Say {w}."}] for w in ("hi", "yes", "no", "ok", "bye", "go")]
        warmed, _ = asyncio.run(run_load(url, warm, 2, 4))
        replicas = {r["replica"] for r in warmed}
        before = wait_for_counters(url, replicas, len(warm))
        results, wall = asyncio.run(run_load(url, requests, args.concurrency, args.max_tokens))
        replicas |= {r["replica"] for r in results}
        after = wait_for_counters(url, replicas, len(requests) + len(warm))
    per_replica = {}
    for replica, c in after.items():
        b = before.get(replica, {})
        queried = c.get("queried", 0) - b.get("queried", 0)
        hit = c.get("hit", 0) - b.get("hit", 0)
        per_replica[replica] = {
            "requests": sum(1 for r in results if r["replica"] == replica),
            "prompt_tokens_queried": queried,
            "prompt_tokens_hit": hit,
            "hit_rate": round(hit / queried, 4) if queried else None,
        }
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in results)
    queried = sum(p["prompt_tokens_queried"] for p in per_replica.values())
    hit = sum(p["prompt_tokens_hit"] for p in per_replica.values())
    return {
        "router": router,
        "wall_s": round(wall, 2),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 2),
        "ttft_mean_s": round(statistics.mean(ttfts), 3),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "latency_mean_s": round(statistics.mean(r["latency_s"] for r in results), 3),
        "hit_rate": round(hit / queried, 4) if queried else None,
        "replicas": per_replica,
    }


def summarize(phases: list[dict]) -> dict:
    by = {}
    for p in phases:
        by.setdefault(p["router"], []).append(p)
    mean = {
        router: {
            k: round(statistics.mean(p[k] for p in ps), 4) for k in ("output_tokens_per_s", "ttft_mean_s", "hit_rate")
        }
        for router, ps in by.items()
    }
    ours, theirs = mean.get("specserve"), mean.get("ray")
    ratios = None
    if ours and theirs:
        ratios = {
            "throughput_ray_over_specserve": round(theirs["output_tokens_per_s"] / ours["output_tokens_per_s"], 3),
            "ttft_ray_over_specserve": round(theirs["ttft_mean_s"] / ours["ttft_mean_s"], 3),
        }
    return {"mean_by_router": mean, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4, help="distinct system prompts")
    ap.add_argument("--per-prompt", type=int, default=10, help="questions per system prompt")
    ap.add_argument("--words", type=int, default=480, help="words per system prompt (about one token each)")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--kv-cache-gib", type=float, default=0.25)
    ap.add_argument("--order", default="specserve,ray,ray,specserve", help="routers, one phase each")
    ap.add_argument("--cpus", type=int, default=4, help="logical CPUs of the private Ray instance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import ray

    requests = workload(args.prompts, args.per_prompt, args.words, args.seed)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        phases = []
        for router in args.order.split(","):
            phases.append(phase(router, args, requests))
            print(json.dumps({k: v for k, v in phases[-1].items() if k != "replicas"}), file=sys.stderr)
    finally:
        ray.shutdown()
    report = {"config": vars(args) | {"out": str(args.out)}, "phases": phases, **summarize(phases)}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
