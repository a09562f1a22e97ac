"""The adaptive loop of test_adaptation_serve.py with `draft_worker.enabled`: the replica runs in a placement group
(its bundle and the draft worker's), the optimizer it creates must still be placed outside it, and the release is
installed in the draft worker actor and swapped in as a remote drafter. The same scenario and assertions: drift,
a retrain (the optimizer killed mid-way), the swap, more tokens per step after it, every response the target's."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("ray")

from cluster.local_cluster import served_app  # noqa: E402
from scripts.bench_drift import app_args  # noqa: E402
from tests.test_adaptation_serve import (  # noqa: E402, F401 - the scenario, run again on this module's app
    K_POLICY,
    chats,
    test_chat_traffic_drifts_retrains_and_swaps_in_a_better_drafter,
)

pytestmark = pytest.mark.slow
RAY_CPUS = 4  # test_adaptation_serve.py's 3, and the draft worker's bundle


@pytest.fixture(scope="module")
def base_url(local_ray, tmp_path_factory):
    args = app_args(tmp_path_factory.mktemp("drift"), 8, 4, k_policy=K_POLICY)
    args["draft_worker"] = {"enabled": True}
    with served_app(args) as url:
        yield url


def test_the_release_drafted_in_the_draft_worker(base_url):
    """The plan's only drafter is n-gram lookup, which runs in the replica: every call to the actor is the
    release's."""
    stats = httpx.get(f"{base_url}/v1/stats", timeout=30).json()["replica"]["draft_worker"]
    assert stats["draft_worker_calls"] > 0 and stats["draft_worker_failures"] == 0, stats
