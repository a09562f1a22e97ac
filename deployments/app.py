"""The Serve application: `import_path: deployments.app:build_app` in serve_config.yaml.

    Ingress (OpenAI HTTP API, completion cache)  --DeploymentHandle-->  LLMServer replicas
                                                            (prefix-affinity request router, autoscaled;
                                                             each replica: engine loop + its TP shard actors)

A target replica reserves one placement-group bundle for itself, one per tensor-parallel shard and one for its
draft worker, so Serve places (and autoscales) a replica and its actors as one unit. Its block manager actor
needs no resources and runs on the replica's node.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.app_config import AppConfig, load_app_config
from deployments.ingress import Ingress
from deployments.llm_server import LLMServer
from deployments.request_router import request_router_config


def server_options(config: AppConfig) -> dict[str, Any]:
    """Deployment options of the target replicas, from the validated app config."""
    target = config.target
    options = target.replica_options()
    options["max_queued_requests"] = target.max_queued_requests
    options["health_check_period_s"] = 10
    options["graceful_shutdown_timeout_s"] = 30
    shard, draft = target.shard_resources, target.draft_resources
    shard_bundle = {"CPU": shard.num_cpus, **({"GPU": shard.num_gpus} if shard.num_gpus else {})}
    if config.tensor_parallel_size > 1:
        # Bundle 0: the replica (scheduler loop, sampling). Bundles 1..tp: one per shard (its GPU on CUDA).
        bundles = [{"CPU": 1}] + [shard_bundle] * config.tensor_parallel_size
    else:
        bundles = [shard_bundle]  # the replica runs the forward itself
    if config.draft_worker.enabled:  # last bundle: the draft worker (its own GPU on CUDA)
        draft_gpus = draft.num_gpus or (1 if config.engine.device.startswith("cuda") else 0)
        bundles.append({"CPU": draft.num_cpus, **({"GPU": draft_gpus} if draft_gpus else {})})
    options["ray_actor_options"] = {"num_cpus": bundles[0]["CPU"], "num_gpus": bundles[0].get("GPU", 0)}
    if len(bundles) > 1:  # the replica's actor goes into bundle 0, so its resources are that bundle's
        options["placement_group_bundles"] = bundles
        default = "PACK" if any("GPU" in b for b in bundles) else "STRICT_PACK"
        options["placement_group_strategy"] = target.placement_strategy or default
    affinity = config.ingress.prefix_affinity
    if affinity.enabled:
        options["request_router_config"] = request_router_config(
            stats_period_s=affinity.stats_period_s,
            imbalance_threshold=affinity.imbalance_threshold,
            router=affinity.router,
        )
    return options


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve's app builder: validates `args` (a ValueError naming the bad key) and wires the deployments."""
    config = load_app_config(args)
    raw = config.model_dump(mode="json")
    server = serve.deployment(LLMServer, name="LLMServer").options(**server_options(config)).bind(raw)
    ingress = serve.deployment(Ingress, name="Ingress").options(
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(server, raw)
