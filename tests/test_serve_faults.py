"""Faults and cancellation against `serve deploy` on a `ray start --head` cluster (the app of serve_config.yaml:
tensor_parallel_size 2, a draft worker, the block manager actor and the completion cache actor, one replica).

- Cancellation: requests dropped at random points of their life (before the response headers, right after
  them, mid-stream, non-streamed while waiting): afterwards the replica runs nothing and holds no KV block.
- Faults: greedy streams in flight while one actor is SIGKILLed (what a crash or an OOM kill looks like):
  the draft worker, the shards, the block manager, the completion cache, the ingress's replica, the target
  replica. Every stream ends with its finish reason and exactly the text the in-process engine gives, or with
  an OpenAI error event followed by [DONE]; none ends silently. The actors the replica repairs lose nothing,
  and a dead cache is a miss. The time until the app serves again is measured from the kill.
(Overload is checked in tests/test_serve_hardening.py; scripts/hostile_run.py measures it at 4x capacity.)
Run with `-s` to see the figures (one JSON line per check, prefixed FIGURES).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from cluster import hostile_client as hc
from cluster.local_cluster import LocalCluster
from tests.conftest import greedy_reference

PROMPT = "def bubble_sort(items):\n    "
MAX_TOKENS = 40
PROBE_TOKENS = 8
STREAMS = 3  # in flight at each kill
UP_S = 420.0  # bound on a deploy or a replica restart (4 model loads) on a busy 2-core machine
IDLE_S = 30.0  # bound on freeing everything after the last disconnect


def app_config() -> dict:
    return hc.fault_app_config(tensor_parallel_size=2, cache=True)


def figures(name: str, data: dict) -> None:
    print(f"\nFIGURES {name} {json.dumps(data, sort_keys=True)}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(num_cpus=12)
    try:
        c.wait_ready()
        c.deploy(app_config(), tmp_path_factory.mktemp("faults") / "serve_config.yaml")
        hc.wait_deployed(c, UP_S)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(make_engine) -> dict[int, str]:
    return greedy_reference(make_engine, PROMPT, (MAX_TOKENS, PROBE_TOKENS))


def story(i: int) -> dict:
    animal = ["fox", "owl", "cat", "eel", "yak"][i % 5]
    return hc.completion_body(f"Story {i}: a long tale of a {animal} who ", 300, stream=True)


def test_requests_dropped_at_random_points_leave_nothing_running_or_held(cluster, reference):
    assert hc.request(cluster.url, hc.completion_body(PROMPT, MAX_TOKENS)).text == reference[MAX_TOKENS]
    start = time.time()
    where = asyncio.run(hc.disconnect_many(cluster.url, 60, story, concurrency=8, seed=16))
    dropped_s = time.time() - start
    left, idle_s = hc.wait_until_idle(cluster.url, IDLE_S)
    figures(
        "cancellation",
        {"requests": 60, "dropped_at": where, "wall_s": round(dropped_s, 1), "idle_after_s": idle_s, "left": left},
    )
    assert sum(where.values()) == 60
    assert where.get("before_headers", 0) + where.get("non_stream", 0) >= 10, where  # the early points were hit
    assert where.get("mid_stream", 0) >= 5, where
    assert idle_s is not None, f"{IDLE_S} s after the last disconnect the replica still holds {left}"
    # and it serves the next request normally
    assert hc.request(cluster.url, hc.completion_body(PROMPT, MAX_TOKENS)).text == reference[MAX_TOKENS]


@pytest.mark.slow
@pytest.mark.parametrize("victim", list(hc.VICTIMS))
def test_streams_end_cleanly_whatever_actor_is_killed(cluster, reference, victim):
    class_name, must_complete = hc.victim_class(victim), hc.VICTIMS[victim][1]
    assert cluster.actors(class_name), f"no live {class_name} to kill"
    before = hc.stats(cluster.url)
    bodies = [hc.completion_body(PROMPT, MAX_TOKENS) for _ in range(STREAMS)]
    outcomes, killed, at = hc.streams_under_fault(cluster.url, bodies, lambda: cluster.kill(class_name))
    probe = hc.completion_body(PROMPT, PROBE_TOKENS, stream=False)
    again_s, polls = hc.time_to_serve(cluster.url, probe, at, timeout_s=UP_S, expect_text=reference[PROBE_TOKENS])
    counts = hc.count_kinds(outcomes)
    figures(
        f"fault:{victim}",
        {**counts, "killed": killed, "serves_again_s": again_s and round(again_s, 1), "polls": hc.count_kinds(polls)},
    )
    assert killed >= 1
    assert counts["silent"] == 0, hc.explain(outcomes, "silent")
    assert [o.text for o in outcomes if o.kind == "completed"] == [reference[MAX_TOKENS]] * counts["completed"]
    for o in outcomes:
        if o.kind == "error":
            assert o.error["message"] and "Traceback" not in o.error["message"], o.error
    if must_complete:
        assert counts["completed"] == STREAMS, hc.explain(outcomes)
    assert again_s is not None, f"not serving {UP_S} s after the kill: {hc.explain(polls[-3:])}"
    assert hc.count_kinds(polls)["silent"] == 0, hc.explain(polls, "silent")
    if victim == "completion_cache":  # a cache that is restarting is a miss, not a failed request
        assert [p.kind for p in polls] == ["completed"], hc.explain(polls)
    if victim == "draft_worker":  # speculation paused; the target alone finished the streams
        failures = hc.stats(cluster.url)["draft_worker"]["draft_worker_failures"]
        assert failures > before["draft_worker"]["draft_worker_failures"]
    if victim in ("shards", "block_manager"):  # the step failed, the replica rebuilt the actor and recomputed
        assert hc.stats(cluster.url)["num_recoveries"] > before["num_recoveries"]
    # whole again: a full stream gives the reference
    assert hc.request(cluster.url, hc.completion_body(PROMPT, MAX_TOKENS)).text == reference[MAX_TOKENS]
