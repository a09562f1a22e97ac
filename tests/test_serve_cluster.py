"""`serve deploy serve_config.yaml` against a `ray start --head` cluster, the way users run it.

The app is serve_config.yaml with test-sized settings: tensor_parallel_size 2 (gloo), a draft worker and a
block manager actor per replica, autoscaling 1..2. The streamed text is exactly the in-process engine's, with
the draft worker drafting; sustained load starts a second replica that serves traffic, and it goes away after
the load. Actor kills mid-stream (each actor, the replica and the ingress included) are in test_serve_faults.py.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import yaml

from cluster import hostile_client as hc
from cluster.local_cluster import REPO, LocalCluster
from sampling.params import SamplingParams

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "def bubble_sort(items):\n    "
MAX_TOKENS = 40
UP_S = 420.0  # bound on a deploy or a scale-up (model loads of 4 actors) on a busy 2-core machine


def app_config() -> dict:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    args["engine"].update(
        kv_cache_gib=0.25, max_model_len=1024, speculator="draft", draft_num_layers=4, draft_kv_cache_gib=0.05
    )
    args["tensor_parallel_size"] = 2
    args["draft_worker"]["enabled"] = True
    args["ingress"]["completion_cache"]["enabled"] = False  # every request must reach a replica here
    args["ingress"]["prefix_affinity"]["stats_period_s"] = 0.5
    args["target"]["autoscaling_config"].update(
        target_ongoing_requests=2, upscale_delay_s=0, downscale_delay_s=5, look_back_period_s=2
    )
    return config


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(num_cpus=12)
    try:
        c.wait_ready()
        start = time.time()
        c.deploy(app_config(), tmp_path_factory.mktemp("cluster") / "serve_config.yaml")
        deadline = start + UP_S
        while time.time() < deadline:
            try:
                r = httpx.post(f"{c.url}/v1/completions", json=body(PROMPT, 1, stream=False), timeout=60)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"no answer within {UP_S} s of serve deploy: {c.status()}")
        c.deploy_to_first_token_s = time.time() - start
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(make_engine) -> str:
    """What the target alone says: the in-process engine, TP=1, no speculation."""
    engine = make_engine(kv_cache_gib=0.25, max_model_len=1024)
    return engine.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0].text


def body(prompt: str, max_tokens: int, stream: bool = True) -> dict:
    return hc.completion_body(prompt, max_tokens, stream)


def replica_stats(c: LocalCluster) -> dict:
    return hc.stats(c.url)


def stream_text(url: str) -> str:
    """Stream a completion; it must end with its finish reason and [DONE]."""
    out = hc.request(url, body(PROMPT, MAX_TOKENS))
    assert out.kind == "completed", out.summary()
    return out.text


def test_serve_deploy_reaches_running_and_answers(cluster):
    status = yaml.safe_load(cluster.serve("status"))["applications"]["specserve"]  # the CLI users run
    assert status["status"] == "RUNNING"
    assert status["deployments"]["LLMServer"]["status"] == "HEALTHY"
    assert cluster.running_replicas() == 1
    assert cluster.deploy_to_first_token_s < UP_S
    models = httpx.get(f"{cluster.url}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_tp2_with_the_draft_worker_gives_the_target_tokens(cluster, reference):
    assert len(cluster.actors("ShardWorker")) == 2 and len(cluster.actors("BlockManagerActor")) == 1
    assert stream_text(cluster.url) == reference
    deadline = time.time() + UP_S  # the draft model loads in the background; drafts start once it is up
    while not replica_stats(cluster)["draft_worker"]["draft_worker_calls"] and time.time() < deadline:
        assert stream_text(cluster.url) == reference
    stats = replica_stats(cluster)
    assert stats["draft_worker"]["draft_worker_calls"] > 0 and stats["spec_drafted"] > 0


def test_sustained_load_scales_to_two_replicas_that_both_serve_then_back_to_one(cluster):
    stop = threading.Event()
    served_by: set[str] = set()

    def load(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            prompt = f"Story {i}.{n}: once upon a time a {['fox', 'owl', 'cat'][n % 3]} "  # no shared prefix
            try:
                r = httpx.post(f"{cluster.url}/v1/completions", json=body(prompt, 16, stream=False), timeout=600)
                served_by.add(r.headers.get("x-specserve-replica", ""))
            except httpx.HTTPError:
                pass

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + UP_S
        while cluster.running_replicas() < 2 and time.time() < deadline:
            time.sleep(2)
        assert cluster.running_replicas() == 2, cluster.status()
        served_by.clear()
        deadline = time.time() + UP_S
        while len(served_by - {""}) < 2 and time.time() < deadline:
            time.sleep(1)
        assert len(served_by - {""}) == 2, served_by
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=600)
    deadline = time.time() + 180
    while cluster.running_replicas() > 1 and time.time() < deadline:
        time.sleep(2)
    assert cluster.running_replicas() == 1, cluster.status()
