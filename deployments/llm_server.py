"""The target replica: a Serve deployment that runs the engine's scheduler loop for one KV pool.

Each replica owns an LLMEngine driven by an AsyncEngine thread, and the actors around it:
- the block manager actor (`block_manager_actor.py`) that owns the pool's KV pages, one call per step;
- with tensor_parallel_size > 1, ShardWorker actors that run the forward, in this replica's own
  placement-group bundles (bundle 0 is the replica, bundles 1..tp the shards);
- with `draft_worker.enabled`, the DraftWorker actor in the last bundle, proposing for the whole batch.
Serve reserves, places and releases a replica and its actors together. When a step fails (a shard or the
block manager died), `_repair` rebuilds what is dead and the requests in flight are recomputed; a dead draft
worker only turns speculation off until it is back. The replica streams plain dicts to the router and
publishes load, free KV blocks and recent prompt prefixes for the request router (`record_routing_stats`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
import torch
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.app_config import AppConfig, load_app_config
from deployments.block_manager_actor import RemoteBlockManager
from deployments.routing_policy import RecentPrefixes, ReplicaStats
from deployments.sharded_runner import ShardedRunner, ShardFailure
from engine.async_engine import AsyncEngine, EngineStepError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams, describe_validation_error
from engine.tokenization import RequestError

log = logging.getLogger("ray.serve")


def error_item(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"type": "error", "status": status, "message": message, "param": param}


class LLMServer:
    """Serve deployment class (wrapped with `serve.deployment` in app.py, where its options are set)."""

    def __init__(self, app_config: dict[str, Any]):
        self.config: AppConfig = load_app_config(app_config)
        self.model_id = self.config.served_model_name
        self.runner = None
        self.draft = self._make_draft_proposer()
        self.engine = AsyncEngine(self._make_engine, on_step_error=self._repair)  # built on the engine thread
        self.max_model_len = self.engine.engine.max_model_len
        self.prefixes = RecentPrefixes()
        self.num_requests = 0
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # constructed outside Serve
            self.replica_id = "local"

    def _make_engine(self) -> LLMEngine:
        self.runner = self._make_runner()
        return LLMEngine(
            self.config.engine,
            runner=self.runner,
            proposer=self.draft,
            make_block_manager=RemoteBlockManager if self.config.target.block_manager_actor else None,
        )

    def _make_runner(self) -> ShardedRunner | None:
        tp = self.config.tensor_parallel_size
        if tp == 1:  # the forward runs here, on the CPUs this replica reserved
            torch.set_num_threads(max(1, int(self.config.target.shard_resources.num_cpus)))
            return None

        res = self.config.target.shard_resources
        return ShardedRunner.from_config(
            self.config.engine,
            tp,
            cpus_per_shard=res.num_cpus,
            placement_group=ray.util.get_current_placement_group(),
            bundle_offset=1,
        )

    def _make_draft_proposer(self):
        if not self.config.draft_worker.enabled:
            return None
        from deployments.draft_worker import RemoteDraftProposer, start_draft_worker

        pg = ray.util.get_current_placement_group()
        actor = start_draft_worker(
            self.config.engine,
            self.config.target.draft_resources,
            placement_group=pg,
            bundle_index=len(pg.bundle_specs) - 1 if pg is not None else -1,
        )
        # The replica serves at once; speculation starts when the draft model has loaded.
        return RemoteDraftProposer(actor, device=self.config.engine.device)

    def _repair(self, error: Exception) -> bool:
        """After a failed step: rebuild the shard group or block manager if dead. True = go on (the engine then
        recomputes the requests in flight); an exception here ends them with an error instead."""
        log.warning("engine step failed, repairing: %s", error)
        if self.runner is not None:
            try:
                self.runner.check_health(timeout_s=10)
            except ShardFailure:
                log.warning("rebuilding the tensor-parallel shards")
                self.runner.restart()
        blocks = self.engine.engine.block_manager
        if isinstance(blocks, RemoteBlockManager) and not blocks.alive():
            log.warning("restarting the block manager actor")
            blocks.restart()
        return True

    # ---- requests -------------------------------------------------------------------------------------

    def _prepare(self, request: dict[str, Any]) -> tuple[list[int], SamplingParams]:
        """Token ids and sampling params; RequestError (-> 400) for anything the engine cannot serve."""
        engine = self.engine.engine
        if request.get("messages") is not None:
            ids = engine.encode(messages=request["messages"])
        else:
            ids = engine.encode(request.get("prompt"))
        if not ids:
            raise RequestError("prompt is empty")
        kwargs = dict(request.get("params") or {})
        room = self.max_model_len - len(ids)
        if room < 1:
            raise RequestError(f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len}")
        if kwargs.get("max_tokens") is None:
            kwargs["max_tokens"] = room
        elif kwargs["max_tokens"] > room:
            raise RequestError(
                f"max_tokens={kwargs['max_tokens']} plus the prompt's {len(ids)} tokens exceeds the model's "
                f"context of {self.max_model_len} tokens"
            )
        try:
            return ids, SamplingParams(**kwargs)
        except ValidationError as e:
            raise RequestError(describe_validation_error(e)) from None

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream of dicts: one {"type": "start"}, then {"type": "delta"} items (the last has a finish_reason),
        or a single {"type": "error"} item. The router reads the first item before it answers the client."""
        self.num_requests += 1
        try:
            ids, params = self._prepare(request)
        except RequestError as e:
            yield error_item(400, str(e), "messages" if request.get("messages") is not None else "prompt")
            return
        self.prefixes.add(request.get("prefix_keys") or ())
        request_id = request.get("request_id") or uuid.uuid4().hex
        outputs = self.engine.generate(ids, params, request_id=request_id)
        try:
            first = await outputs.__anext__()
        except RequestError as e:
            yield error_item(400, str(e))
            return
        except EngineStepError as e:
            yield error_item(503, str(e))
            return
        yield {"type": "start", "prompt_tokens": len(ids), "request_id": request_id, "replica": self.replica_id}
        out = first
        try:
            while True:
                yield {
                    "type": "delta",
                    "text": out.delta,
                    "token_ids": out.new_token_ids,
                    "finish_reason": out.finish_reason,
                    "completion_tokens": len(out.output_token_ids),
                }
                if out.finished:
                    return
                out = await outputs.__anext__()
        except EngineStepError as e:
            yield error_item(503, str(e))
        finally:
            await outputs.aclose()

    # ---- introspection -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Engine counters plus the block manager's own view (and the draft worker's, if any)."""
        out = {**self.engine.stats(), "num_requests": self.num_requests, "model": self.model_id}
        try:
            out["block_manager"] = self.engine.engine.block_manager.stats()
        except Exception as e:  # noqa: BLE001 - being repaired
            out["block_manager"] = {"error": str(e)}
        if self.draft is not None:
            out["draft_worker"] = self.draft.stats()
        return out

    def record_routing_stats(self) -> dict[str, Any]:
        s = self.engine.stats()
        return ReplicaStats(
            replica_id="",
            num_waiting=s["num_waiting"],
            num_running=s["num_running"],
            free_kv_blocks=s["free_kv_blocks"],
            total_kv_blocks=s["total_kv_blocks"],
            prefix_keys=frozenset(self.prefixes.snapshot()),
        ).to_dict()

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("engine loop thread died")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if getattr(self, "runner", None) is not None:
            self.runner.shutdown()
        if getattr(self, "draft", None) is not None:
            ray.kill(self.draft.actor, no_restart=True)
