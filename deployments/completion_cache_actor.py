"""One CompletionCache shared by every router replica: a named Ray actor, created by whoever asks first.

Sharing matters for admission: with N routers each seeing a repeated prompt once, N private caches would
never reach `admit_after` sightings. The actor is a thin shell (all logic is in completion_cache.py); it asks
for no CPU so it never competes with engine actors for a slot, and it runs its calls one at a time.
"""

from __future__ import annotations

from typing import Any

import ray

from deployments.completion_cache import CachedCompletion, CacheKey, CompletionCache

DEFAULT_ACTOR_NAME = "specserve-completion-cache"
DEFAULT_NAMESPACE = "specserve"


@ray.remote(num_cpus=0, max_restarts=-1)
class CompletionCacheActor:
    """Remote face of CompletionCache; a restart loses the contents, which only costs hits."""

    def __init__(self, **cache_kwargs: Any):
        self._cache = CompletionCache(**cache_kwargs)

    def get(self, key: CacheKey) -> CachedCompletion | None:
        return self._cache.get(key)

    def offer(self, key: CacheKey, value: CachedCompletion | dict[str, Any]) -> bool:
        return self._cache.offer(key, value)

    def invalidate_model(self, model_id: str) -> int:
        return self._cache.invalidate_model(model_id)

    def set_model_version(self, model_id: str, version: str) -> int:
        return self._cache.set_model_version(model_id, version)

    def stats(self) -> dict[str, Any]:
        return self._cache.stats()


def get_or_create_cache_actor(
    name: str = DEFAULT_ACTOR_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    detached: bool = False,
    **cache_kwargs: Any,
) -> ray.actor.ActorHandle:
    """The cache actor called `name` in `namespace`, created with `cache_kwargs` if it does not exist yet.

    Every caller gets the same actor (`get_if_exists=True` makes the race between routers safe); the kwargs
    of a later caller are ignored. `detached=True` lets the cache outlive the job that created it (Serve
    replicas come and go); remove it then with `ray.kill`.
    """
    options: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    return CompletionCacheActor.options(**options).remote(**cache_kwargs)
