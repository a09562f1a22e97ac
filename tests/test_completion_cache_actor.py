"""The shared cache actor: every get-or-create call reaches the same cache (starts a 1-CPU local Ray); a
ingress's CacheClient turns a restarting or dead actor into misses, and reconnects to a new one."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import ray

from deployments.completion_cache import CachedCompletion, make_key
from deployments.completion_cache_actor import BurstLog, CacheClient, get_or_create_cache_actor

RAY_CPUS = 1


def test_routers_share_one_cache_and_admission_counts_across_them(local_ray):
    first = get_or_create_cache_actor(name="test-cache", namespace="specserve-test", admit_after=2)
    second = get_or_create_cache_actor(name="test-cache", namespace="specserve-test", admit_after=99)
    assert first._actor_id == second._actor_id  # the later caller's settings are ignored
    key = make_key("m", "v1", {"prompt": "hi", "temperature": 0, "max_tokens": 4})
    assert ray.get(first.get.remote(key)) is None  # ingress 1 sees it once
    assert ray.get(second.get.remote(key)) is None  # ingress 2 sees it once: two sightings in all
    assert ray.get(second.offer.remote(key, CachedCompletion("hello", (1, 2), "length", 3, 2))) is True
    hit = ray.get(first.get.remote(key))
    assert hit.text == "hello" and hit.finish_reason == "length"
    stats = ray.get(first.stats.remote())
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 2, 1)
    assert ray.get(first.set_model_version.remote("m", "v2")) == 1
    ray.kill(first)


def test_burst_log_logs_the_first_failure_of_each_burst():
    log = BurstLog(quiet_s=10)
    assert [log.should_log(t) for t in (0, 1, 2, 9, 30, 31)] == [True, False, False, False, True, False]
    assert log.suppressed == 4


def test_client_serves_misses_while_the_actor_restarts_or_is_gone(local_ray):
    def connect():
        return get_or_create_cache_actor(name="client-cache", namespace="specserve-test", admit_after=1)

    key = make_key("m", "v1", {"prompt": "hi", "temperature": 0, "max_tokens": 4})
    done = CachedCompletion("hello", (1, 2), "length", 3, 2)

    async def scenario():
        client = CacheClient(connect, timeout_s=0.5, reconnect_s=0.0)
        assert await client.get(key) is None
        client.offer(key, done)
        deadline = time.monotonic() + 30  # the offer lands in the background (a busy machine may take a while)
        while (hit := await client.get(key)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert hit is not None and hit.text == "hello"
        ray.kill(connect(), no_restart=False)  # restarting: calls fail or time out, never raise
        t0 = time.monotonic()
        results = [await client.get(key) for _ in range(3)]
        client.offer(key, done)
        assert all(r is None or r.text == "hello" for r in results) and time.monotonic() - t0 < 10
        ray.kill(connect(), no_restart=True)  # gone for good: the client makes a new, empty one
        # The kill lands asynchronously: the first calls may still reach the restarted actor, which holds the offer.
        deadline = time.monotonic() + 30
        while ((stats := await client.stats()) is None or stats["entries"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert stats is not None and stats["entries"] == 0, stats
        return client.failures

    assert asyncio.run(scenario()) >= 1
    ray.kill(connect())


def test_a_cancelled_lookup_is_not_taken_for_a_miss():
    """Ray cancels a request's child calls as it cancels the request, so the cache call fails in the same instant
    the lookup is cancelled; the lookup must end cancelled, not return a miss that lets the request go on to
    open a replica stream for a client that has left (no Ray needed: the call is a future failed by hand)."""

    async def scenario():
        call = asyncio.get_running_loop().create_future()

        actor = SimpleNamespace(get=SimpleNamespace(remote=lambda key: call))  # the handle's one method called
        client = CacheClient(lambda: actor, timeout_s=5)
        lookup = asyncio.ensure_future(client.get(make_key("m", "v1", {"prompt": "hi"})))
        await asyncio.sleep(0.01)  # the lookup is waiting on the call
        call.set_exception(ray.exceptions.TaskCancelledError())
        lookup.cancel()
        try:
            return await lookup
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(scenario()) == "cancelled"
