"""The adaptive loop on a local Ray cluster: code traffic at the plan's level, then chat traffic that n-gram lookup
serves worse than the plan expects (drift), a drafter distilled from the logged chat traffic, judged on a held-out
slice and swapped into the live replica; the optimizer killed mid-retrain and the loop going on. Every response
equals plain greedy decoding of the target throughout."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray = pytest.importorskip("ray")

from cli.prompts import load_prompts, sharegpt_to_jsonl  # noqa: E402
from cluster.local_cluster import served_app  # noqa: E402
from sampling.params import SamplingParams  # noqa: E402
from speculator.cost_model import StepTimes  # noqa: E402
from speculator.plan import Acceptance, DrafterProfile, build_plan  # noqa: E402
from speculator.workload_class import ClassRule, rules_spec  # noqa: E402
from tests.conftest import humaneval_prompts  # noqa: E402

pytestmark = pytest.mark.slow
RAY_CPUS = 3
MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 32
ENGINE = {"kv_cache_gib": 0.25, "max_model_len": 1024}


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> list[str]:
    path = tmp_path_factory.mktemp("sharegpt") / "chats.jsonl"
    sharegpt_to_jsonl(path, 72)
    return [s.messages[0]["content"][:1200] for s in load_prompts(path)]


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory) -> str:
    """One class for all traffic ("any"), planned on code: n-gram lookup at 1.6 tokens per step."""
    ngram = DrafterProfile(seconds_per_token=1e-5, by_class={"any": Acceptance(survival=[0.4, 0.15, 0.05], steps=100)})
    plan = build_plan(rules_spec([ClassRule(name="any", regex="(?s).")]), StepTimes((1, 4), (0.02, 0.021)),
                      {"ngram": ngram}, 3)  # fmt: skip
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(plan.model_dump_json())
    return str(path)


@pytest.fixture(scope="module")
def base_url(local_ray, plan_path, tmp_path_factory):
    args = {
        "engine": {**ENGINE, "speculator": "auto", "plan": plan_path, "num_speculative_tokens": 3},
        "target": {"num_replicas": 1, "shard_resources": {"num_cpus": 1}, "admission": {"max_waiting": 64}},
        "ingress": {"completion_cache": {"enabled": False}},
        "adaptation": {
            "enabled": True,
            "store_dir": str(tmp_path_factory.mktemp("store")),
            "records_per_class": 48,
            "min_records": 32,
            "drift_requests": 6,
            "window_requests": 12,
            "retrain_cooldown_s": 2,
            "report_interval_s": 1,
            "optimizer_cpus": 1,
            "distill": {"n_predict": 3, "draft_vocab": 2048, "epochs": 12, "batch_size": 32, "lr": 3e-3},
        },
    }
    with served_app(args) as url:
        yield url


def optimizer():
    return ray.get_actor("specserve-optimizer-specserve", namespace="specserve")


def complete(base_url: str, prompt: str, chat: bool) -> str:
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    if chat:
        messages = [{"role": "user", "content": prompt}]
        r = httpx.post(f"{base_url}/v1/chat/completions", json={**body, "messages": messages}, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    r = httpx.post(f"{base_url}/v1/completions", json={**body, "prompt": prompt}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def speculation(base_url: str) -> list[dict]:
    return httpx.get(f"{base_url}/v1/stats", timeout=30).json()["replica"]["speculation"]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_traffic_drifts_retrains_and_swaps_in_a_better_drafter(base_url, chats, make_engine):
    reference = make_engine(**ENGINE)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    code = humaneval_prompts(8)
    expected_code = [o.text for o in reference.generate(code, params)]
    expected_chat = [o.text for o in reference.generate([[{"role": "user", "content": c}] for c in chats], params)]
    got: dict[tuple[bool, int], str] = {}

    def run(kind: bool, indices: range, workers: int = 4) -> None:
        prompts = chats if kind else code
        with ThreadPoolExecutor(workers) as pool:
            for i, text in zip(indices, pool.map(lambda i: complete(base_url, prompts[i], kind), indices)):
                got[(kind, i)] = text

    run(False, range(len(code)))  # code: at the plan's level, no drift
    assert ray.get(optimizer().state.remote())["drifted"] == []
    run(True, range(0, 48))  # chat: below the plan, logged for retraining
    state = wait_for(lambda: (s := ray.get(optimizer().state.remote()))["retraining"] and s, 120, "a retrain")
    ray.kill(optimizer(), no_restart=False)  # mid-retrain: the actor restarts, the replica keeps serving
    run(True, range(48, 56))
    state = wait_for(
        lambda: (s := ray.get(optimizer().state.remote()))["releases"] and s, 300, "a release after the restart"
    )
    release = state["releases"][-1]
    assert release["status"] == "live" and release["score"] > release["baseline"], release
    wait_for(lambda: any(s["version"] == str(release["version"]) for s in speculation(base_url)), 60, "the swap")
    run(True, range(56, len(chats)))  # chat again, on the new drafter
    rows = {(s["drafter"], s["version"]): s for s in speculation(base_url) if s["class"] == "any"}
    before, after = rows[("ngram", "0")], rows[("mlp:any", str(release["version"]))]
    assert after["window_tokens_per_step"] > before["window_tokens_per_step"], rows
    assert [got[(False, i)] for i in range(len(code))] == expected_code
    assert [got[(True, i)] for i in range(len(chats))] == expected_chat
