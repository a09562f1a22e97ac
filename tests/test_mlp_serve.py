"""A learned drafter served end to end: the Serve app with `engine.speculator: mlp` and the drafter in the draft
worker actor (the target's hidden rows travel with each propose call) answers over HTTP exactly what the
in-process engine without speculation says, and its drafts were made by the actor and accepted.

Real Ray (the shared lock), real HTTP, the default model and the test drafter of `mlp_drafter`."""

from __future__ import annotations

import httpx
import pytest

from cluster.local_cluster import served_app
from sampling.params import SamplingParams
from tests.conftest import mlp_training_chats

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
RAY_CPUS = 3  # for the local_ray fixture: the replica, its draft worker and the ingress


@pytest.fixture(scope="module")
def base_url(local_ray, mlp_drafter):
    args = {
        "engine": {
            "speculator": "mlp",
            "speculator_model": str(mlp_drafter),
            "k_policy": "backoff",  # drafts every step; the cost model's k follows this machine's timings
            "kv_cache_gib": 0.25,
            "max_model_len": 1024,
        },
        "target": {"num_replicas": 1, "shard_resources": {"num_cpus": 1}, "draft_resources": {"num_cpus": 1}},
        "ingress": {"completion_cache": {"enabled": False}},
        "draft_worker": {"enabled": True},
    }
    with served_app(args) as url:
        yield url


def replica_stats(base_url: str) -> dict:
    return httpx.get(f"{base_url}/v1/stats", timeout=30).json()["replica"]


def test_learned_drafter_in_the_draft_worker_serves_the_targets_tokens(base_url, make_engine):
    # The replica serves at once; its first steps ping the worker, which drafts from then on.
    reference = make_engine(kv_cache_gib=0.25, max_model_len=1024)
    for messages in mlp_training_chats(2):
        body = {"model": MODEL, "messages": messages, "max_tokens": 32, "temperature": 0}
        r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        want = reference.generate([messages], SamplingParams(max_tokens=32))[0]
        assert r.json()["choices"][0]["message"]["content"] == want.text
    stats = replica_stats(base_url)
    assert stats["draft_worker"]["draft_worker_calls"] > 0 and stats["draft_worker"]["draft_worker_failures"] == 0
    assert stats["spec_drafted"] > 0 and stats["spec_accepted"] > 0
