"""The local test cluster (`ray start --head` with token auth off) listens on loopback only (but for what Ray
Serve binds to [::] itself), and its proxies carry the stream guard: killing the ingress mid-stream ends every
stream with an error event and [DONE], and the app serves again once Serve has replaced the ingress."""

from __future__ import annotations

import pytest

from cluster import hostile_client as hc
from cluster.local_cluster import LocalCluster
from cluster.loopback import LOOPBACK_IPS, listening
from deployments.proxy_guard import INTERRUPTED_CODE

pytestmark = pytest.mark.slow
UP_S = 420.0
REPLICA = "ray::ServeReplica"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    config = hc.fault_app_config(tensor_parallel_size=1, cache=False)
    args = config["applications"][0]["args"]
    args["draft_worker"]["enabled"] = False
    args["engine"]["speculator"] = "ngram"
    args["target"]["block_manager_actor"] = False
    c = LocalCluster(num_cpus=4)
    try:
        c.wait_ready()
        c.deploy(config, tmp_path_factory.mktemp("guard") / "serve_config.yaml")
        hc.wait_deployed(c, UP_S)
        yield c
    finally:
        c.stop()


def test_no_port_of_the_cluster_listens_on_all_interfaces(cluster):
    sockets = listening(cluster.head.pid)
    assert {cluster.gcs_port, cluster.dash_port, cluster.http_port} <= {port for _, port, _ in sockets}
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith(REPLICA) for n in names), names
    exposed = [s for s in sockets if s[0] not in LOOPBACK_IPS]
    # Ray Serve 2.60 binds each replica's inter-deployment gRPC server to [::] (cluster/loopback.py): one
    # port for the Ingress replica and one for the LLMServer's, and nothing else
    assert sorted(name for _, _, name in exposed) == [f"{REPLICA}:specserve:{d}" for d in ("Ingress", "LLMServer")]


def test_ingress_killed_mid_stream_ends_with_an_error_event(cluster):
    bodies = [hc.completion_body(f"def task_{i}(items):\n    ", 200) for i in range(3)]
    ingress = hc.victim_class("ingress")
    outcomes, killed, killed_at = hc.streams_under_fault(cluster.url, bodies, lambda: cluster.kill(ingress), after=2)
    assert killed == 1
    assert [o.kind for o in outcomes] == ["error"] * len(bodies), [o.summary() for o in outcomes]
    for o in outcomes:
        assert o.status == 200 and o.done and o.error["code"] == INTERRUPTED_CODE and o.error["type"] == "server_error"
    took, polls = hc.time_to_serve(cluster.url, hc.completion_body("Hello", 2), since=killed_at, timeout_s=UP_S)
    assert took is not None, [p.summary() for p in polls[-3:]]
