"""Routing policy: prefix keys, affinity vs load, tie-breaking, remembered routes; the router's request parsing."""

from __future__ import annotations

import pytest

from deployments.routing_policy import (
    RecentPrefixes,
    ReplicaStats,
    RoutingPolicy,
    prefix_keys,
)

SYSTEM = "You are a careful assistant. " * 20  # ~580 characters shared by every request below


def stats(rid: str, waiting: int = 0, running: int = 0, free: int = 100, keys=()) -> ReplicaStats:
    return ReplicaStats(rid, waiting, running, free, 100, frozenset(keys))


# ---- prefix keys -----------------------------------------------------------------------------------------


def test_shared_leading_text_shares_keys_up_to_its_length():
    shared_part = "s" * 300
    a = prefix_keys(shared_part + "a" * 1700)
    b = prefix_keys(shared_part + "b" * 1700)
    assert len(a) == len(b) == 3  # 1024, 256, 64 characters
    assert a[0] != b[0]  # the 1024-character prefixes differ
    assert a[1:] == b[1:]  # the 256- and 64-character ones lie inside the shared part


def test_keys_are_longest_first_and_only_for_covered_lengths():
    keys = prefix_keys("x" * 300)
    assert len(keys) == 2  # 256 and 64; 1024 and 4096 are longer than the prompt
    assert keys == prefix_keys("x" * 310)
    assert keys[-1:] == prefix_keys("x" * 64)
    assert prefix_keys("short") == []
    assert prefix_keys(None) == [] and prefix_keys("") == []


def test_different_beginnings_share_nothing():
    assert not set(prefix_keys("A" + SYSTEM)) & set(prefix_keys("B" + SYSTEM))


def test_token_ids_and_messages_have_keys():
    ids = list(range(300))
    assert len(prefix_keys(ids)) == 3  # 256, 64, 16 tokens
    assert prefix_keys(ids)[-1] == prefix_keys(ids[:16] + [9999] * 50)[-1]
    chat1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "one"}]
    chat2 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "two"}]
    assert set(prefix_keys(chat1)) & set(prefix_keys(chat2))
    parts = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}, {"role": "user", "content": "one"}]
    assert prefix_keys(parts) == prefix_keys(chat1)
    assert not set(prefix_keys("x" * 100)) & set(prefix_keys([120] * 100))  # text and ids never match


def test_recent_prefixes_are_bounded_and_keep_the_newest():
    recent = RecentPrefixes(capacity=3)
    recent.add(["a", "b", "c"])
    recent.add(["a"])  # refreshed
    recent.add(["d"])
    assert recent.snapshot() == ["c", "a", "d"]


def test_stats_round_trip_and_tolerate_missing_fields():
    s = stats("r1", 2, 3, 40, keys={"k1", "k2"})
    assert ReplicaStats.from_dict("r1", s.to_dict()) == s
    empty = ReplicaStats.from_dict("r2", {})
    assert empty.load == 0 and empty.prefix_keys == frozenset()
    assert ReplicaStats.from_dict("r3", None).replica_id == "r3"


# ---- policy ------------------------------------------------------------------------------------------------


def test_least_loaded_wins_without_affinity():
    policy = RoutingPolicy(seed=0)
    replicas = [stats("a", 3, 4), stats("b", 0, 2), stats("c", 1, 5)]
    assert policy.choose(replicas) == "b"


def test_load_ties_break_on_free_kv_blocks():
    policy = RoutingPolicy(seed=0)
    replicas = [stats("a", 0, 2, free=10), stats("b", 1, 1, free=90), stats("c", 0, 2, free=50)]
    for _ in range(10):
        assert policy.choose(replicas) == "b"


def test_full_ties_are_spread_not_herded():
    policy = RoutingPolicy(seed=1)
    replicas = [stats(r) for r in "abcd"]
    assert len({policy.choose(replicas) for _ in range(50)}) > 1


def test_affinity_wins_when_load_is_close():
    policy = RoutingPolicy(imbalance_threshold=4)
    keys = prefix_keys(SYSTEM + "q")
    replicas = [stats("idle", 0, 0), stats("warm", 1, 3, keys=[keys[-1]])]
    assert policy.choose(replicas, keys) == "warm"
    assert policy.rank(replicas, keys) == [["warm"], ["idle"]]


def test_affinity_loses_to_a_much_lower_load():
    policy = RoutingPolicy(imbalance_threshold=4)
    keys = prefix_keys(SYSTEM + "q")
    replicas = [stats("idle", 0, 1), stats("warm", 4, 8, keys=keys)]
    assert policy.choose(replicas, keys) == "idle"
    assert policy.rank(replicas, keys) == [["idle"], ["warm"]]


def test_the_longest_matching_prefix_wins():
    policy = RoutingPolicy()
    keys = prefix_keys(SYSTEM + "q")  # longest first
    replicas = [stats("short", 0, 0, keys=[keys[-1]]), stats("long", 0, 1, keys=[keys[0]])]
    assert policy.choose(replicas, keys) == "long"


def test_among_holders_the_least_loaded_is_picked():
    policy = RoutingPolicy()
    keys = prefix_keys(SYSTEM)
    replicas = [stats("h1", 0, 3, keys=keys), stats("h2", 0, 1, keys=keys), stats("other", 0, 0)]
    assert policy.choose(replicas, keys) == "h2"


def test_rank_puts_every_replica_somewhere_once():
    policy = RoutingPolicy(seed=3)
    keys = prefix_keys(SYSTEM)
    replicas = [stats("a", 0, 0), stats("b", 0, 1), stats("c", 5, 5, keys=keys), stats("d", 2, 2)]
    ranks = policy.rank(replicas, keys)
    flat = [r for rank in ranks for r in rank]
    assert sorted(flat) == ["a", "b", "c", "d"]
    assert ranks[0] == ["a", "b"] or ranks[0] == ["b", "a"]  # within one request of the least: a tie
    assert policy.rank([], keys) == [] and policy.choose([], keys) is None


def test_remembered_routes_give_affinity_before_stats_catch_up():
    policy = RoutingPolicy(remember=10)
    keys = prefix_keys(SYSTEM + "first")
    replicas = [stats("a"), stats("b"), stats("c")]
    policy.remember(keys, "c")
    assert policy.choose(replicas, prefix_keys(SYSTEM + "second")) == "c"
    policy.forget_replica("c")
    assert len(policy.rank(replicas, keys)[0]) == 3  # no affinity left: one rank of equals


def test_remembered_routes_are_bounded():
    policy = RoutingPolicy(remember=5)
    for i in range(50):
        policy.remember([f"k{i}"], "a")
    assert len(policy._routed) == 5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        RoutingPolicy(imbalance_threshold=-1)
    with pytest.raises(ValueError):
        RecentPrefixes(capacity=0)


# ---- the Serve router's view of a request ------------------------------------------------------------------


class _Pending:
    """Stands in for ray.serve.request_router.PendingRequest: only .args and .kwargs are read."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = list(args), kwargs


def test_router_reads_prompts_from_dicts_models_and_explicit_keys():
    from deployments.openai_protocol import ChatCompletionRequest, CompletionRequest
    from deployments.request_router import request_prefix_keys

    text = SYSTEM + "q"
    assert request_prefix_keys(_Pending({"prompt": text})) == prefix_keys(text)
    assert request_prefix_keys(_Pending("ignored", request={"prompt_token_ids": list(range(64))})) == prefix_keys(
        list(range(64))
    )
    model = CompletionRequest(model="m", prompt=text)
    assert request_prefix_keys(_Pending(model)) == prefix_keys(text)
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": text}])
    assert request_prefix_keys(_Pending(chat)) == prefix_keys([{"role": "user", "content": text}])
    assert request_prefix_keys(_Pending({"prefix_keys": ["k"]})) == ["k"]
    assert request_prefix_keys(_Pending(1, "two")) == []
    assert request_prefix_keys(None) == []


def test_serve_router_ranks_replicas_from_routing_stats_and_live_queue_lengths():
    """The Serve shell end to end, without a cluster: stats dicts in, ranked RunningReplica-likes out."""
    import asyncio

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest, ReplicaID

    from deployments.request_router import PrefixAffinityRouter

    deployment = DeploymentID("engine", "specserve")

    class FakeReplica:  # what choose_replicas reads from a RunningReplica
        def __init__(self, rid: str, published: dict):
            self.replica_id = ReplicaID(rid, deployment)
            self.routing_stats = published
            self.max_ongoing_requests = 64

    text = SYSTEM + "q"

    async def run():
        router = PrefixAffinityRouter(deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state(imbalance_threshold=4)
        idle = FakeReplica("idle", stats("idle").to_dict())
        warm = FakeReplica("warm", stats("warm", 1, 1, keys=prefix_keys(text)).to_dict())
        fresh = FakeReplica("fresh", {})  # has not published yet
        pending = PendingRequest(args=[{"prompt": text}], kwargs={}, metadata=RequestMetadata("r1", "r1"))

        def ids(ranks):
            return [sorted(r.replica_id.unique_id for r in rank) for rank in ranks]

        assert ids(await router.choose_replicas([idle, warm, fresh], pending)) == [["warm"], ["fresh", "idle"]]
        assert pending.routing_context.should_backoff
        # a fresher queue length than the published stats says "warm" is swamped: affinity gives way
        router.replica_queue_len_cache.update(warm.replica_id, 20)
        assert ids(await router.choose_replicas([idle, warm, fresh], pending)) == [["fresh", "idle"], ["warm"]]
        # where a request went is remembered for its prefix until the stats catch up
        router.on_request_routed(pending, idle.replica_id, None)
        other = PendingRequest(args=[{"prompt": SYSTEM + "other"}], kwargs={}, metadata=RequestMetadata("r2", "r2"))
        assert ids(await router.choose_replicas([idle, fresh], other))[0] == ["idle"]
        assert await router.choose_replicas([], other) == []

    asyncio.run(run())
