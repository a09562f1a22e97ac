"""Ray Serve request router for engine replicas: prefix affinity and load, decided by routing_policy.py.

How Serve 2.60 feeds it (read from ray/serve/_private/request_router/*, router.py, deployment_state.py):
stats: a deployment defines `record_routing_stats(self) -> dict` (sync or async); the controller calls it every
`RequestRouterConfig.request_routing_stats_period_s` and broadcasts the dict to every handle's router, where it
is `RunningReplica.routing_stats` (`{}` until the first call returns). Request: `choose_replicas` gets a
`PendingRequest` whose `.args` / `.kwargs` are the (already resolved) arguments of `handle.method.remote(...)`,
and `.metadata` (request_id, call_method, is_streaming, multiplexed_model_id). So affinity works for calls
through a DeploymentHandle (router deployment -> engine deployment), not for raw HTTP into an ingress, whose
args are ASGI internals. `on_request_routed` tells where a request went (used to remember prefixes).

Use: `@serve.deployment(request_router_config=request_router_config())` on the engine deployment, whose
`record_routing_stats` returns `ReplicaStats(...).to_dict()`. Serve pickles this module by value into each
router, but it imports `deployments.routing_policy` by name: the project must be installed on every node.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from deployments.routing_policy import ReplicaStats, RoutingPolicy, prefix_keys

ROUTER_CLASS_PATH = "deployments.request_router:PrefixAffinityRouter"
RAY_ROUTER_CLASS_PATH = "deployments.ray_prefix_router:RayPrefixCacheRouter"  # imported by Serve only if chosen
_PROMPT_FIELDS = ("prompt_token_ids", "prompt", "messages")


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def request_prefix_keys(pending_request: PendingRequest | None) -> list[str]:
    """Affinity keys of a request: an explicit `prefix_keys` field, else hashed from the first argument (or
    keyword value) that carries `prompt_token_ids`, `prompt` or `messages` (a dict or any object, e.g. a
    CompletionRequest). No such argument: no affinity, plain load balancing."""
    if pending_request is None:
        return []
    for arg in [*pending_request.args, *pending_request.kwargs.values()]:
        if isinstance(arg, (str, bytes, int, float, list, tuple)) or arg is None:
            continue
        explicit = _field(arg, "prefix_keys")
        if isinstance(explicit, (list, tuple)):
            return [str(k) for k in explicit]
        for name in _PROMPT_FIELDS:
            value = _field(arg, name)
            if value:
                if name == "messages" and not isinstance(value[0], dict):  # pydantic messages
                    value = [m.model_dump() if hasattr(m, "model_dump") else m for m in value]
                return prefix_keys(value)
    return []


class PrefixAffinityRouter(RequestRouter):
    """Ranks candidates with RoutingPolicy; Serve then picks, within the first rank that has room, the replica
    with the shortest live queue, so stale stats decide only between replicas that look alike."""

    def initialize_state(self, imbalance_threshold: int = 4, remember: int = 4096, seed: int | None = None) -> None:
        """Called by Serve with `RequestRouterConfig.request_router_kwargs`."""
        self._policy = RoutingPolicy(imbalance_threshold=imbalance_threshold, remember=remember, seed=seed)

    @property
    def policy(self) -> RoutingPolicy:
        if not hasattr(self, "_policy"):  # Serve always calls initialize_state; direct construction may not
            self.initialize_state()
        return self._policy

    def _stats(self, replica: RunningReplica) -> ReplicaStats:
        """Published stats, with the load raised to the live queue length when this router knows a fresher one."""
        stats = ReplicaStats.from_dict(replica.replica_id.unique_id, replica.routing_stats)
        live = self.replica_queue_len_cache.get(replica.replica_id)
        if live is not None and live > stats.load:
            return replace(stats, num_waiting=live - stats.num_running)
        return stats

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranks = self.policy.rank([self._stats(r) for r in candidate_replicas], request_prefix_keys(pending_request))
        if pending_request is not None:
            # Every candidate is in the ranks: if none has room, back off before trying again.
            pending_request.routing_context.should_backoff = True
        return [[by_id[i] for i in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        keys = request_prefix_keys(pending_request)
        if keys:
            self.policy.remember(keys, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget_replica(replica_id.unique_id)


def request_router_config(
    stats_period_s: float = 2.0,
    stats_timeout_s: float = 10.0,
    imbalance_threshold: int = 4,
    remember: int = 4096,
    router: str = "specserve",
) -> RequestRouterConfig:
    """The RequestRouterConfig that puts PrefixAffinityRouter (or, with router="ray", Ray Serve LLM's
    PrefixCacheAffinityRouter with the same imbalance threshold) in front of a deployment."""
    if router == "ray":
        cls, kwargs = RAY_ROUTER_CLASS_PATH, {"imbalanced_threshold": imbalance_threshold}
    else:
        cls, kwargs = ROUTER_CLASS_PATH, {"imbalance_threshold": imbalance_threshold, "remember": remember}
    return RequestRouterConfig(
        request_router_class=cls,
        request_router_kwargs=kwargs,
        request_routing_stats_period_s=stats_period_s,
        request_routing_stats_timeout_s=stats_timeout_s,
    )
