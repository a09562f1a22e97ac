"""The adaptive loop under a traffic shift, on a local Ray cluster: code prompts (HumanEval) at the plan's level,
then recurring ShareGPT chats that n-gram lookup serves below it. Prints JSON: requests and failures, seconds from
the shift to drift being reported, to the retrained drafter's release and to its first request; tokens per step
(window) of code on n-gram, chat on n-gram and chat on the new drafter; chat requests from the shift until the
class's tokens per step reached 90% of the adapted level (counted at the granularity of rounds).

    python scripts/bench_drift.py --chats 8 --repeats 4 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ray

from cli.prompts import load_prompts, sharegpt_to_jsonl
from cluster.local_cluster import local_app
from speculator.cost_model import StepTimes
from speculator.plan import Acceptance, DrafterProfile, build_plan
from speculator.workload_class import ClassRule, rules_spec
from tests.conftest import humaneval_prompts

MODEL = "SmolLM2-135M-Instruct"


def chat_prompts(folder: Path, n: int) -> list[str]:
    """The first `n` ShareGPT questions, cut to 300 characters (the chat traffic repeats them)."""
    sharegpt_to_jsonl(folder / "chats.jsonl", n)
    return [s.messages[0]["content"][:300] for s in load_prompts(folder / "chats.jsonl")]


def app_args(tmp: Path, chats: int, repeats: int, k_policy: str | None = None) -> dict:
    """One class for all traffic ("any") planned on code, n-gram at 1.6 tokens per step; adaptation retrains
    once a round of chats (`chats` x `repeats`) is logged. `k_policy` (None: the engine's default) backoff makes
    k independent of the machine's measured step times (the cost model drafts less under load where verified
    rows cost more)."""
    ngram = DrafterProfile(seconds_per_token=1e-5, by_class={"any": Acceptance(survival=[0.4, 0.15, 0.05], steps=100)})
    plan = build_plan(rules_spec([ClassRule(name="any", regex="(?s).")]), StepTimes((1, 4), (0.02, 0.021)),
                      {"ngram": ngram}, 3)  # fmt: skip
    (tmp / "plan.json").write_text(plan.model_dump_json())
    logged = chats * repeats
    return {
        "engine": {
            "kv_cache_gib": 0.25,
            "max_model_len": 1024,
            "speculator": "auto",
            "plan": str(tmp / "plan.json"),
            "num_speculative_tokens": 3,
            **({"k_policy": k_policy} if k_policy else {}),
        },  # fmt: skip
        "target": {"num_replicas": 1, "shard_resources": {"num_cpus": 1}, "admission": {"max_waiting": 64}},
        "ingress": {"completion_cache": {"enabled": False}},
        "adaptation": {
            "enabled": True,
            "store_dir": str(tmp / "store"),
            "records_per_class": logged,
            "min_records": logged,
            "drift_requests": 6,
            "window_requests": 12,
            "retrain_cooldown_s": 2,
            "report_interval_s": 1,
            "optimizer_cpus": 1,
            "distill": {"n_predict": 3, "draft_vocab": 2048, "epochs": 20, "batch_size": 32, "lr": 3e-3},
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chats", type=int, default=8)
    p.add_argument("--repeats", type=int, default=4, help="times each chat is asked per round")
    p.add_argument("--rounds", type=int, default=8, help="chat rounds after the shift")
    p.add_argument("--code", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    chats = chat_prompts(tmp, args.chats)
    code = humaneval_prompts(args.code)
    failed, served = [0], [0]
    with local_app(app_args(tmp, args.chats, args.repeats), num_cpus=4) as url:

        def complete(item: tuple[bool, str]) -> None:
            chat, prompt = item
            body = {"model": MODEL, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
            if chat:
                body["messages"], route = [{"role": "user", "content": prompt}], "chat/completions"
            else:
                body["prompt"], route = prompt, "completions"
            r = httpx.post(f"{url}/v1/{route}", json=body, timeout=600)
            served[0] += 1
            failed[0] += r.status_code != 200

        def run(items: list[tuple[bool, str]]) -> None:
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(complete, items))

        def rows() -> dict:
            stats = httpx.get(f"{url}/v1/stats", timeout=30).json()["replica"]["speculation"]
            return {(s["drafter"], s["version"]): s for s in stats if s["class"] == "any"}

        run([(False, c) for c in code])
        time.sleep(2)  # the replica creates the optimizer actor on its first report
        optimizer = ray.get_actor("specserve-optimizer-specserve", namespace="specserve")
        code_tps = rows()[("ngram", "0")]["window_tokens_per_step"]
        shift = time.time()
        marks: dict[str, float] = {}
        history = []
        for round_ in range(args.rounds):
            run([(True, c) for _ in range(args.repeats) for c in chats])
            state = ray.get(optimizer.state.remote())
            if state["drifted"] or state["retraining"] or state["releases"]:
                marks.setdefault("drift_reported_s", time.time() - shift)
            live = [r for r in state["releases"] if r["status"] == "live"]
            if live:
                marks.setdefault("release_s", live[-1]["created"] + live[-1]["seconds"] - shift)
            now = rows()
            new = [v for (d, _), v in now.items() if d.startswith("mlp:")]
            if new:
                marks.setdefault("first_request_on_new_drafter_s", time.time() - shift)
            history.append({"round": round_ + 1, "requests": (round_ + 1) * len(chats) * args.repeats,
                            "ngram": now[("ngram", "0")]["window_tokens_per_step"],
                            "adapted": new[0]["window_tokens_per_step"] if new else None})  # fmt: skip
        final = ray.get(optimizer.state.remote())
    adapted = history[-1]["adapted"]
    recovered = next((h["requests"] for h in history if adapted and h["adapted"] and h["adapted"] >= 0.9 * adapted),
                     None)  # fmt: skip
    print(json.dumps({
        "requests": served[0], "failed_requests": failed[0], **{k: round(v, 1) for k, v in marks.items()},
        "tokens_per_step": {"code_ngram": code_tps, "chat_ngram": history[-1]["ngram"], "chat_adapted": adapted},
        "chat_requests_until_90pct_of_adapted": recovered, "releases": final["releases"], "history": history,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
