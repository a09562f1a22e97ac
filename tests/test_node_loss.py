"""Losing a node under load, on a two-node Ray cluster on one machine (a second `ray start --address ...`).

The app (tensor_parallel_size 2, a draft worker, placement strategy SPREAD) is laid out so that the draft
worker and one shard sit on the second node while the replica and the other shard stay on the head: while
the app deploys, a detached placement group holds all but 1.6 of the head's CPUs, and the bundles' sizes
(replica 1, shards 0.6, draft 1.4 CPU; the second node has 2) leave only that split. The hold is released
before the fault, so the head can take the lost bundles back. Then the second node is stopped with streams
in flight: each ends with its finish reason (and the in-process engine's exact text) or an error event and
[DONE], and the app serves again without a manual step, the lost shard and draft worker rebuilt on the head
and drafting again (a step that finds the draft worker missing goes without drafts).
Run with `-s` to see the figures (a JSON line prefixed FIGURES).
"""

from __future__ import annotations

import json
import time

import pytest

from cluster import hostile_client as hc
from cluster.local_cluster import LocalCluster
from tests.conftest import greedy_reference

PROMPT = "def bubble_sort(items):\n    "
MAX_TOKENS = 48
PROBE_TOKENS = 8
STREAMS = 3
UP_S = 420.0
HEAD_CPUS, WORKER_CPUS, HEAD_FREE = 8, 2, 1.6  # the head: replica (1) + a shard; the worker: a shard + draft
SHARD_CPUS, DRAFT_CPUS = 0.6, 1.4
HOLD = "specserve-test-head-hold"


def app_config() -> dict:
    config = hc.fault_app_config(tensor_parallel_size=2, cache=False)
    config["proxy_location"] = "HeadOnly"  # both nodes share the host: one proxy, one HTTP port
    target = config["applications"][0]["args"]["target"]
    target["placement_strategy"] = "SPREAD"
    target["shard_resources"]["num_cpus"] = SHARD_CPUS
    target["draft_resources"]["num_cpus"] = DRAFT_CPUS
    return config


def figures(name: str, data: dict) -> None:
    print(f"\nFIGURES {name} {json.dumps(data, sort_keys=True)}")


def node_of(c: LocalCluster, class_name: str) -> list[str]:
    return sorted(a.node_id for a in c.actors(class_name))


def draft_stats(c: LocalCluster) -> dict:
    return hc.stats(c.url)["draft_worker"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(num_cpus=HEAD_CPUS)
    try:
        c.wait_ready()
        from ray.util.state import list_nodes

        deadline = time.time() + 60
        while not (nodes := list_nodes(address=c.dashboard)) and time.time() < deadline:
            time.sleep(1)
        c.head_node = nodes[0].node_id
        c.driver(
            "from ray.util.placement_group import placement_group\n"
            f"pg = placement_group([{{'CPU': {HEAD_CPUS - HEAD_FREE}}}], name='{HOLD}', lifetime='detached')\n"
            "ray.get(pg.ready(), timeout=60)\n"
        )
        # The ingress (no CPU) is placed now, on the head; the replica's group waits for the second node.
        c.deploy(app_config(), tmp_path_factory.mktemp("node_loss") / "serve_config.yaml")
        c.add_worker_node(WORKER_CPUS)
        hc.wait_deployed(c, UP_S)
        deadline = time.time() + UP_S  # the draft model loads in the background; wait until it drafts
        while not draft_stats(c)["draft_worker_calls"] and time.time() < deadline:
            hc.request(c.url, hc.completion_body(PROMPT, 8, stream=False))
        c.driver(f"ray.util.remove_placement_group(ray.util.get_placement_group('{HOLD}'))\n")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(make_engine) -> dict[int, str]:
    return greedy_reference(make_engine, PROMPT, (MAX_TOKENS, PROBE_TOKENS))


def test_the_placement_strategy_option_reaches_the_replicas_placement_group():
    from deployments.app import server_options
    from deployments.app_config import load_app_config

    args = app_config()["applications"][0]["args"]
    assert server_options(load_app_config(args))["placement_group_strategy"] == "SPREAD"
    del args["target"]["placement_strategy"]  # the default on CPU: the whole replica on one node
    assert server_options(load_app_config(args))["placement_group_strategy"] == "STRICT_PACK"
    with pytest.raises(ValueError, match="placement_strategy"):
        load_app_config({**args, "target": {**args["target"], "placement_strategy": "STRICT_SPREAD"}})


@pytest.mark.slow
def test_losing_the_node_with_the_draft_worker_and_a_shard_ends_streams_cleanly_and_the_app_recovers(
    cluster, reference
):
    head = cluster.head_node
    assert cluster.worker is not None and cluster.worker.poll() is None, cluster.worker_log.read_text()[-3000:]
    replica = node_of(cluster, "ServeReplica:specserve:LLMServer")
    shards, drafts = node_of(cluster, "ShardWorker"), node_of(cluster, "DraftWorker")
    assert replica == [head], (replica, head)
    assert len(shards) == 2 and shards.count(head) == 1, shards  # one shard on each node
    assert len(drafts) == 1 and drafts[0] != head, drafts
    assert draft_stats(cluster)["draft_worker_healthy"]
    assert hc.request(cluster.url, hc.completion_body(PROMPT, MAX_TOKENS)).text == reference[MAX_TOKENS]
    before = hc.stats(cluster.url)

    bodies = [hc.completion_body(PROMPT, MAX_TOKENS) for _ in range(STREAMS)]
    outcomes, _, at = hc.streams_under_fault(cluster.url, bodies, cluster.stop_worker_node)
    probe = hc.completion_body(PROMPT, PROBE_TOKENS, stream=False)
    again_s, polls = hc.time_to_serve(cluster.url, probe, at, timeout_s=UP_S, expect_text=reference[PROBE_TOKENS])
    after = hc.stats(cluster.url)
    counts = hc.count_kinds(outcomes)
    figures(
        "node_loss",
        {
            **counts,
            "serves_again_s": again_s and round(again_s, 1),
            "polls": hc.count_kinds(polls),
            "recoveries": after["num_recoveries"] - before["num_recoveries"],
            **{
                k: after["draft_worker"][k] - before["draft_worker"][k]
                for k in ("draft_worker_fallback_steps", "draft_worker_failures", "draft_worker_resyncs")
            },
        },
    )
    assert counts["silent"] == 0, hc.explain(outcomes, "silent")
    assert [o.text for o in outcomes if o.kind == "completed"] == [reference[MAX_TOKENS]] * counts["completed"]
    assert again_s is not None, f"not serving {UP_S} s after the node stopped: {hc.explain(polls[-3:])}"
    assert hc.count_kinds(polls)["silent"] == 0, hc.explain(polls, "silent")
    # The app is whole on the head alone: the lost actors came back there, a full stream is exact, and it is
    # drafted again. (No step can run while a shard is missing, and the draft worker is usually back before
    # the rebuilt shards: then no step goes without drafts. A draft worker lost alone is test_serve_faults.py.)
    assert hc.request(cluster.url, hc.completion_body(PROMPT, MAX_TOKENS)).text == reference[MAX_TOKENS]
    assert node_of(cluster, "ShardWorker") == [head, head] and node_of(cluster, "DraftWorker") == [head]
    assert hc.stats(cluster.url)["spec_drafted"] > after["spec_drafted"]
    assert cluster.status()["deployments"]["LLMServer"]["status"] == "HEALTHY"
