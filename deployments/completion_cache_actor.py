"""One CompletionCache shared by every ingress replica: a named Ray actor, created by whoever asks first.

Sharing matters for admission: with N ingress replicas each seeing a repeated prompt once, N private caches would
never reach `admit_after` sightings. The actor is a thin shell (all logic is in completion_cache.py); it asks
for no CPU so it never competes with engine actors for a slot, and it runs its calls one at a time.

The cache is an optimisation, so a ingress talks to it through `CacheClient`: every call has a short timeout
and any failure (the actor restarting, gone) is a miss or a dropped offer, never a failed request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError

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

    Every caller gets the same actor (`get_if_exists=True` makes the race between ingress replicas safe); the kwargs
    of a later caller are ignored. `detached=True` lets the cache outlive the job that created it (Serve
    replicas come and go); remove it then with `ray.kill`.
    """
    options: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    return CompletionCacheActor.options(**options).remote(**cache_kwargs)


log = logging.getLogger("ray.serve")


class BurstLog:
    """Says whether to log a failure: the first of a burst (failures less than `quiet_s` apart) only."""

    def __init__(self, quiet_s: float = 30.0):
        self.quiet_s = quiet_s
        self._last: float | None = None
        self.suppressed = 0

    def should_log(self, now: float) -> bool:
        first = self._last is None or now - self._last >= self.quiet_s
        self._last = now
        if not first:
            self.suppressed += 1
        return first


class CacheClient:
    """A ingress's side of the cache actor: bounded calls, failures are misses (get) or dropped (offer).

    `connect()` returns the actor handle (get-or-create); after a failed call it is called again, at most every
    `reconnect_s`, so a cache killed without restart comes back as a new, empty one."""

    def __init__(self, connect: Callable[[], Any], timeout_s: float = 0.5, reconnect_s: float = 5.0):
        self._connect, self.timeout_s, self.reconnect_s = connect, timeout_s, reconnect_s
        self._actor: Any = None
        self._next_connect = 0.0
        self._log = BurstLog()
        self._pending: set[asyncio.Task] = set()
        self.failures = 0
        self._actor_or_none()

    def _actor_or_none(self) -> Any:
        if self._actor is None and time.monotonic() >= self._next_connect:
            self._next_connect = time.monotonic() + self.reconnect_s
            try:
                self._actor = self._connect()
            except Exception as e:  # noqa: BLE001 - no cache is a miss
                self._failed("connect", e)
        return self._actor

    def _failed(self, what: str, error: BaseException) -> None:
        self.failures += 1
        # An actor that restarts or died: the next call after `reconnect_s` looks it up again by name (a restarting
        # one is found again, one dead for good is replaced by a new, empty one). A timeout keeps the handle.
        if isinstance(error, RayActorError):
            self._actor = None
        if self._log.should_log(time.monotonic()):
            log.warning(
                "completion cache unavailable (%s: %s); serving without it (%d similar failures not logged)",
                what,
                type(error).__name__,
                self._log.suppressed,
            )

    async def _call(self, what: str, method: str, *args: Any) -> Any:
        actor = self._actor_or_none()
        if actor is None:
            return None
        try:
            # Not wait_for: before Python 3.12 it turns a cancellation that meets the call failing (Ray cancels
            # the call with the request) into the call's error, which this would take for a miss and go on.
            async with asyncio.timeout(self.timeout_s):
                return await getattr(actor, method).remote(*args)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - timeouts, actor restarts, deaths: all just "no cache"
            self._failed(what, e)
            return None

    async def get(self, key: CacheKey) -> CachedCompletion | None:
        return await self._call("get", "get", key)

    async def stats(self) -> dict[str, Any] | None:
        return await self._call("stats", "stats")

    def offer(self, key: CacheKey, value: CachedCompletion) -> None:
        """Fire and forget (the reply is awaited in the background, so that a failure is seen and logged)."""
        task = asyncio.get_running_loop().create_task(self._call("offer", "offer", key, value))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
