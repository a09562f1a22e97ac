"""The target replica: a Serve deployment that runs the engine's scheduler loop for one KV pool.

Each replica owns an LLMEngine driven by an AsyncEngine thread, and the actors around it:
- the block manager actor (`block_manager_actor.py`) that owns the pool's KV pages, one call per step;
- with tensor_parallel_size > 1, ShardWorker actors that run the forward, in this replica's own
  placement-group bundles (bundle 0 is the replica, bundles 1..tp the shards);
- with `draft_worker.enabled`, the DraftWorker actor (a draft model or a learned drafter) in the last bundle,
  proposing for the whole batch.
Serve reserves, places and releases a replica and its actors together. When a step fails (a shard or the
block manager died), `_repair` rebuilds what is dead and the requests in flight are recomputed; a dead draft
worker only turns speculation off until it is back. The replica streams plain dicts to the ingress and
publishes load, free KV blocks and recent prompt prefixes for the request router (`record_routing_stats`).

Its constructor returns only once the engine has run a step, so Serve sends it nothing before it can serve.
Prompts are tokenized on a thread of their own, never on the event loop (a long prompt would pause every
stream) nor on the engine thread (it would pause every step), and a request is checked against the engine's
queue and free KV before it is added (admission.py: 503 + Retry-After when full). A request the ingress
resumes after its replica died (`prompt_token_ids` + `resume`) continues from the tokens already streamed.
Error items carry fixed one-line texts; the exception details go to this replica's log.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
import torch
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.admission import ReplicaAdmission
from deployments.app_config import AppConfig, load_app_config
from deployments.block_manager_actor import RemoteBlockManager
from deployments.prompt_limits import max_bytes_per_token, min_tokens
from deployments.replica_stream import error_item
from deployments.resume import ResumedText
from deployments.routing_policy import RecentPrefixes, ReplicaStats
from deployments.sharded_runner import ShardedRunner, ShardFailure
from engine.async_engine import AsyncEngine, EngineStepError, RequestFailed
from engine.llm_engine import LLMEngine
from engine.tokenization import RequestError
from sampling.params import SamplingParams, describe_validation_error

log = logging.getLogger("ray.serve")


# What a failed engine tells the client: one line, no exception text (that goes to the log).
ENGINE_FAILED = "the engine failed while generating this request; retry it"
REQUEST_FAILED = "this request failed in the engine and was ended"


def engine_error_item(error: EngineStepError) -> dict[str, Any]:
    if isinstance(error, RequestFailed):
        return error_item(500, REQUEST_FAILED, code="request_failed")
    return error_item(503, ENGINE_FAILED, code="engine_error", retry_after_s=1)


@dataclass
class Prepared:
    """A request as the engine takes it; a resumed one also carries what was already streamed."""

    ids: list[int]
    params: SamplingParams
    prompt_token_ids: list[int]
    prior_tokens: int = 0  # output tokens streamed before a resume
    resumed: ResumedText | None = None
    finished: str | None = None  # a resumed request whose budget is already spent: its finish reason


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
        self.admitted = 0  # requests handed to the engine and not finished
        target = self.config.target.admission
        engine = self.config.engine
        self.admission = ReplicaAdmission(
            target.max_waiting,
            target.min_free_kv_fraction,
            engine.block_size,
            engine.max_num_seqs,
            target.retry_after_s,
        )
        # Tokenizing runs here, not on the event loop (a long prompt would stall every stream) nor on the engine
        # thread (it would stall every step); one thread, so tokenizing takes at most one core from the engine.
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.bytes_per_token = max_bytes_per_token(self.engine.engine.tokenizer)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # constructed outside Serve
            self.replica_id = "local"

    def _make_engine(self) -> LLMEngine:
        self.runner = self._make_runner()
        engine = LLMEngine(
            self.config.engine,
            runner=self.runner,
            proposer=self.draft,
            make_block_manager=RemoteBlockManager if self.config.target.block_manager_actor else None,
        )
        # A step end to end (kernels, block manager actor, shards) before the replica reports ready.
        engine.generate([engine.encode("Hi")], SamplingParams(max_tokens=1))
        return engine

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
        # The replica serves at once; speculation starts when the drafter has loaded.
        return RemoteDraftProposer.for_config(actor, self.config.engine)

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

    def _prepare(self, request: dict[str, Any]) -> Prepared:
        """Token ids and sampling params (in the tokenizer thread); RequestError (-> 400) for anything the
        engine cannot serve. A request with `prompt_token_ids` and `resume` continues a stream (resume.py)."""
        engine = self.engine.engine
        kwargs = dict(request.get("params") or {})
        if request.get("prompt_token_ids") is not None:
            prompt_ids = engine.encode(list(request["prompt_token_ids"]))
        elif request.get("messages") is not None:
            prompt_ids = engine.encode(messages=request["messages"])
        else:
            prompt = request.get("prompt")
            if isinstance(prompt, str) and self.bytes_per_token:
                least = min_tokens(prompt, self.bytes_per_token)
                if least >= self.max_model_len:  # cannot fit: refused without tokenizing megabytes
                    raise RequestError(
                        f"prompt has at least {least} tokens; the model's context is {self.max_model_len}"
                    )
            prompt_ids = engine.encode(prompt)
        if not prompt_ids:
            raise RequestError("prompt is empty")
        resume = request.get("resume")
        done = list(resume["output_token_ids"]) if resume else []
        if done:
            engine.encode(done)  # validates the ids
        ids = prompt_ids + done
        room = self.max_model_len - len(ids)
        if resume:
            max_tokens = kwargs.get("max_tokens")
            left = room if max_tokens is None else min(room, max_tokens - len(done))
            params = self._params({**kwargs, "max_tokens": max(left, 1), "stop": []})
            resumed = ResumedText(
                engine.tokenizer, prompt_ids, done, resume.get("text", ""), self._params(kwargs | {"max_tokens": 1})
            )
            return Prepared(ids, params, prompt_ids, len(done), resumed, None if left >= 1 else "length")
        if room < 1:
            raise RequestError(f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len}")
        if kwargs.get("max_tokens") is None:
            kwargs["max_tokens"] = room
        elif kwargs["max_tokens"] > room:
            raise RequestError(
                f"max_tokens={kwargs['max_tokens']} plus the prompt's {len(ids)} tokens exceeds the model's "
                f"context of {self.max_model_len} tokens"
            )
        return Prepared(ids, self._params(kwargs), prompt_ids)

    @staticmethod
    def _params(kwargs: dict[str, Any]) -> SamplingParams:
        try:
            return SamplingParams(**kwargs)
        except ValidationError as e:
            raise RequestError(describe_validation_error(e)) from None

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream of dicts: one {"type": "start"} (with the prompt's token ids, for a resume elsewhere), then
        {"type": "delta"} items (the last has a finish_reason), or a single {"type": "error"} item. The ingress
        reads the first item before it answers the client. Cancelling the stream at any point (the ingress
        does when its client goes away) aborts the request and frees its KV blocks."""
        self.num_requests += 1
        param = "messages" if request.get("messages") is not None else "prompt"
        try:
            prep = await asyncio.get_running_loop().run_in_executor(self._tokenize, self._prepare, request)
        except RequestError as e:
            yield error_item(400, str(e), param)
            return
        refusal = self.admission.check(self.engine.stats(), len(prep.ids), self.admitted)
        if refusal is not None and prep.resumed is None:  # a resumed request was admitted once already
            yield error_item(refusal.status, refusal.message, code=refusal.code, retry_after_s=refusal.retry_after_s)
            return
        request_id = request.get("request_id") or uuid.uuid4().hex
        start = {
            "type": "start",
            "prompt_tokens": len(prep.prompt_token_ids),
            "prompt_token_ids": prep.prompt_token_ids,
            "request_id": request_id,
            "replica": self.replica_id,
        }
        if prep.finished is not None:
            yield start
            yield {
                "type": "delta",
                "text": prep.resumed.add([], True),
                "token_ids": [],
                "finish_reason": prep.finished,
                "completion_tokens": prep.prior_tokens,
            }
            return
        self.prefixes.add(request.get("prefix_keys") or ())
        self.admitted += 1
        outputs = self.engine.generate(prep.ids, prep.params, request_id=request_id)
        try:
            try:
                out = await outputs.__anext__()
            except RequestError as e:
                yield error_item(400, str(e), param)
                return
            yield start
            while True:
                text, finish = out.delta, out.finish_reason
                if prep.resumed is not None:
                    text = prep.resumed.add(out.new_token_ids, out.finished)
                    finish = "stop" if prep.resumed.stopped else finish
                yield {
                    "type": "delta",
                    "text": text,
                    "token_ids": out.new_token_ids,
                    "finish_reason": finish,
                    "completion_tokens": prep.prior_tokens + len(out.output_token_ids),
                }
                if finish is not None:
                    return
                out = await outputs.__anext__()
        except EngineStepError as e:
            log.warning("request %s ended by an engine failure: %s", request_id, e)
            yield engine_error_item(e)
        finally:
            self.admitted -= 1
            await outputs.aclose()

    async def ready(self) -> bool:
        """The constructor returned, so the engine is built and has run a step: this replica can serve."""
        return True

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
        if getattr(self, "_tokenize", None) is not None:
            self._tokenize.shutdown(wait=False, cancel_futures=True)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if getattr(self, "runner", None) is not None:
            self.runner.shutdown()
        if getattr(self, "draft", None) is not None:
            ray.kill(self.draft.actor, no_restart=True)
