"""The shared cache actor: every get-or-create call reaches the same cache (starts a 1-CPU local Ray)."""

from __future__ import annotations

import ray

from deployments.completion_cache import CachedCompletion, make_key
from deployments.completion_cache_actor import get_or_create_cache_actor

RAY_CPUS = 1


def test_routers_share_one_cache_and_admission_counts_across_them(local_ray):
    first = get_or_create_cache_actor(name="test-cache", namespace="specserve-test", admit_after=2)
    second = get_or_create_cache_actor(name="test-cache", namespace="specserve-test", admit_after=99)
    assert first._actor_id == second._actor_id  # the later caller's settings are ignored
    key = make_key("m", "v1", {"prompt": "hi", "temperature": 0, "max_tokens": 4})
    assert ray.get(first.get.remote(key)) is None  # router 1 sees it once
    assert ray.get(second.get.remote(key)) is None  # router 2 sees it once: two sightings in all
    assert ray.get(second.offer.remote(key, CachedCompletion("hello", (1, 2), "length", 3, 2))) is True
    hit = ray.get(first.get.remote(key))
    assert hit.text == "hello" and hit.finish_reason == "length"
    stats = ray.get(first.stats.remote())
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 2, 1)
    assert ray.get(first.set_model_version.remote("m", "v2")) == 1
    ray.kill(first)
