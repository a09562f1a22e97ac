"""The target replica: a Serve deployment that runs the engine's scheduler loop for one KV pool.

Each replica owns an LLMEngine driven by an AsyncEngine thread, and the actors around it:
- the block manager actor (`block_manager_actor.py`) that owns the pool's KV pages, one call per step at most;
- with tensor_parallel_size > 1, ShardWorker actors that run the forward, in this replica's own
  placement-group bundles (bundle 0 is the replica, bundles 1..tp the shards);
- with `draft_worker.enabled`, the DraftWorker actor (a draft model or learned drafters: under speculator auto the
  plan's and the adaptive loop's) in the last bundle, proposing for the whole batch.
Serve reserves, places and releases a replica and its actors together. When a step fails (a shard or the
block manager died), `_repair` rebuilds what is dead and the requests in flight are recomputed; a dead draft
worker only turns speculation off until it is back. The replica streams typed items (stream_items.py) to the
ingress and publishes load, free KV blocks and recent prompt prefixes for the request router
(`record_routing_stats`).

Its constructor returns only once the engine has run a step, so Serve sends it nothing before it can serve.
The engine tokenizes and checks each request once, on its input thread (`AsyncEngine.prepare`), never on this
replica's event loop; a raw prompt too long for any tokenization to fit is refused before that
(prompt_limits.py). A request is then checked against the engine's queue and free KV before it is added
(admission.py: 503 + Retry-After when full). A request the ingress resumes after its replica died
(`prompt_token_ids` + `resume`) continues from the tokens already streamed. Error items carry fixed one-line
texts; the exception details go to this replica's log.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.admission import ReplicaAdmission
from deployments.app_config import AppConfig, load_app_config
from deployments.block_manager_actor import RemoteBlockManager
from deployments.logprob_text import TokenTexts
from deployments.prompt_limits import max_bytes_per_token, min_tokens
from deployments.resume import ResumedText
from deployments.routing_policy import RecentPrefixes, ReplicaStats
from deployments.serve_metrics import EngineMetrics, Every
from deployments.sharded_runner import ShardedRunner, ShardFailure
from deployments.stream_items import DeltaItem, ErrorItem, ErrorKind, StartItem, StreamItem
from engine.async_engine import AsyncEngine, EngineStepError, RequestFailed
from engine.llm_engine import LLMEngine, RequestOutput
from engine.tokenization import EngineRequest, RequestError, sampling_params
from sampling.params import SamplingParams

log = logging.getLogger("ray.serve")
METRICS_PERIOD_S = 2.0  # how often the engine's counters are published as metrics


# What a failed engine tells the client: one line, no exception text (that goes to the log).
ENGINE_FAILED = "the engine failed while generating this request; retry it"
REQUEST_FAILED = "this request failed in the engine and was ended"


def engine_error_item(error: EngineStepError) -> ErrorItem:
    if isinstance(error, RequestFailed):
        return ErrorItem(ErrorKind.REQUEST_FAILED, REQUEST_FAILED)
    return ErrorItem(ErrorKind.ENGINE_FAILED, ENGINE_FAILED, retry_after_s=1)


@dataclass(frozen=True)
class Prepared:
    """A request as the engine takes it (None: a resumed request whose budget was already spent) and the
    prompt's token ids; a resumed one also carries what was already streamed."""

    request: EngineRequest | None
    prompt_token_ids: tuple[int, ...]
    resumed: ResumedText | None = None


class LLMServer:
    """Serve deployment class (wrapped with `serve.deployment` in app.py, where its options are set)."""

    def __init__(self, app_config: dict[str, Any]):
        self._shut_down = False
        self.config: AppConfig = load_app_config(app_config)
        self.model_id = self.config.served_model_name
        self.runner = None
        self.draft = self._make_draft_worker()
        self.blocks: RemoteBlockManager | None = None  # the block manager actor's client, if it has one
        self.engine = AsyncEngine(self._make_engine, on_step_error=self._repair)  # built on the engine thread
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
        self.bytes_per_token = max_bytes_per_token(self.engine.tokenizer)
        self.token_texts = TokenTexts(self.engine.tokenizer)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # constructed outside Serve
            self.replica_id = "local"
        self.metrics = EngineMetrics(self.config.engine.speculator)
        self._publisher = Every(METRICS_PERIOD_S, self._publish_metrics)
        self._adapter = self._make_adaptation()

    def _publish_metrics(self) -> None:
        self.metrics.publish(self.engine.stats())
        self.metrics.publish_spec(self.engine.spec_snapshot())

    def _make_engine(self) -> LLMEngine:
        self.runner = self._make_runner()
        engine = LLMEngine(
            self.config.engine,
            runner=self.runner,
            proposer=self.draft.proposer_for(self.config.engine) if self.draft else None,
            make_block_manager=self._make_block_manager if self.config.target.block_manager_actor else None,
        )
        # A step end to end (kernels, block manager actor, shards) before the replica reports ready.
        engine.generate(["Hi"], SamplingParams(max_tokens=1))
        if self.config.adaptation.enabled:  # after the warm-up, which is no traffic to learn from
            engine.log_traffic(self.config.adaptation.records_per_class, self.config.adaptation.window_requests)
        return engine

    def _make_block_manager(self, *args: Any) -> RemoteBlockManager:
        """The block manager actor's client; the replica keeps it to restart a dead actor (`_repair`)."""
        self.blocks = RemoteBlockManager(*args)
        return self.blocks

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

    def _make_draft_worker(self):
        if not self.config.draft_worker.enabled:
            return None
        from deployments.draft_worker import DraftWorkerClient, start_draft_worker

        pg = ray.util.get_current_placement_group()
        actor = start_draft_worker(
            self.config.engine,
            self.config.target.draft_resources,
            placement_group=pg,
            bundle_index=len(pg.bundle_specs) - 1 if pg is not None else -1,
        )
        # The replica serves at once; speculation starts when the drafters have loaded.
        return DraftWorkerClient(actor, device=self.config.engine.device)

    def _make_adaptation(self) -> Every | None:
        """The replica's side of the adaptive loop (deployments/adaptation_agent.py), when enabled."""
        adaptation = self.config.adaptation
        if not adaptation.enabled:
            return None
        from deployments.adaptation_agent import AdaptationAgent
        from deployments.optimizer_actor import get_or_create_optimizer

        try:
            app = serve.get_replica_context().app_name
        except RayServeException:  # constructed outside Serve
            app = "local"
        agent = AdaptationAgent(
            self.engine,
            self.config.engine,
            adaptation,
            lambda: get_or_create_optimizer(app, self.config.engine, adaptation),
            draft_worker=self.draft,
        )
        return Every(adaptation.report_interval_s, agent.tick, name="adaptation")

    def _repair(self, error: Exception) -> bool:
        """After a failed step: rebuild the shard group if dead. True = go on (the engine then recomputes the
        requests in flight, after a reset that restarts a dead block manager); an exception here ends them."""
        log.warning("engine step failed, repairing: %s", error)
        if self.runner is not None:
            try:
                self.runner.check_health(timeout_s=10)
            except ShardFailure:
                log.warning("rebuilding the tensor-parallel shards")
                self.runner.restart()
        return True

    # ---- requests -------------------------------------------------------------------------------------

    async def _prepare(self, request: dict[str, Any]) -> Prepared:
        """The request as the engine takes it, tokenized and checked once by the engine (off this event loop);
        RequestError (-> 400) for anything it cannot serve. A request with `prompt_token_ids` and `resume`
        continues a stream (resume.py)."""
        kwargs = dict(request.get("params") or {})
        if request.get("resume") is not None:
            return await self._prepare_resumed(list(request["prompt_token_ids"]), request["resume"], kwargs)
        prompt = request.get("prompt")
        if isinstance(prompt, str) and self.bytes_per_token:
            least = min_tokens(prompt, self.bytes_per_token)
            if least >= self.engine.max_model_len:  # cannot fit: refused without tokenizing megabytes
                raise RequestError(
                    f"prompt has at least {least} tokens; the model's context is {self.engine.max_model_len}"
                )
        prepared = await self.engine.prepare(prompt, kwargs, messages=request.get("messages"), fit_context=True)
        return Prepared(prepared, prepared.prompt_token_ids)

    async def _prepare_resumed(self, prompt_ids: list[int], resume: dict[str, Any], kwargs: dict) -> Prepared:
        """Prompt + the output already streamed, with the rest of the budget. The engine runs it without stop
        strings: ResumedText replays the output with them, so a stop string across the cut still stops it. The
        logits controls count the output from where it began (`output_start`), as the first replica did."""
        done = list(resume["output_token_ids"])
        left = self.engine.max_model_len - len(prompt_ids) - len(done)
        if kwargs.get("max_tokens") is not None:
            left = min(left, kwargs["max_tokens"] - len(done))
        request = None
        if left >= 1:
            min_left = max(0, (kwargs.get("min_tokens") or 0) - len(done))
            request = await self.engine.prepare(
                prompt_ids + done, {**kwargs, "max_tokens": left, "min_tokens": min_left}
            )
            params = request.params
            # counted from output_start; the prompt's logprobs were sent by the first replica
            update = {"stop": [], "min_tokens": kwargs.get("min_tokens") or 0, "prompt_logprobs": None}
            request = replace(request, params=params.model_copy(update=update), output_start=len(prompt_ids))
        else:  # the budget was spent as the replica died: only text held back is left to send
            params = sampling_params({**kwargs, "max_tokens": 1, "min_tokens": 0})
        resumed = await asyncio.to_thread(
            ResumedText, self.engine.tokenizer, prompt_ids, done, resume.get("text", ""), params
        )
        return Prepared(request, tuple(prompt_ids), resumed)

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[StreamItem]:
        """A StartItem (with the prompt's token ids, for a resume elsewhere), then DeltaItems (each sequence's last
        has a finish_reason; with n > 1 they carry their sequence's index), or a single ErrorItem. The ingress
        reads the first item before it answers the client. Cancelling the stream at any point (the ingress does
        when its client goes away) aborts the request and frees its KV blocks."""
        self.num_requests += 1
        param = "messages" if request.get("messages") is not None else "prompt"
        try:
            prep = await self._prepare(request)
        except RequestError as e:
            yield ErrorItem(ErrorKind.INVALID_REQUEST, str(e), e.param or param)
            return
        if prep.resumed is None:  # a resumed request was admitted once already
            n = len(prep.request.prompt_token_ids)
            refusal = self.admission.check(self.engine.stats(), n, self.admitted)
            if refusal is not None:
                yield ErrorItem(ErrorKind.OVERLOADED, refusal.message, retry_after_s=refusal.retry_after_s)
                return
        request_id = request.get("request_id") or uuid.uuid4().hex
        start = StartItem(prep.prompt_token_ids, self.replica_id)
        if prep.request is None:
            yield start
            yield DeltaItem(prep.resumed.add([], True), (), "length")
            return
        self.prefixes.add(request.get("prefix_keys") or ())
        self.admitted += 1
        outputs = self.engine.generate(prep.request, request_id=request_id)
        self.metrics.request_started(len(prep.prompt_token_ids))
        out, num_tokens = None, 0
        try:
            try:
                out = await outputs.__anext__()
            except RequestError as e:
                yield ErrorItem(ErrorKind.INVALID_REQUEST, str(e), e.param or param)
                return
            yield self._with_prompt(start, request, out)
            while True:
                text, finish = out.delta, out.finish_reason
                if prep.resumed is not None:
                    text = prep.resumed.add(out.new_token_ids, out.finished)
                    finish = "stop" if prep.resumed.stopped else finish
                num_tokens += len(out.new_token_ids)
                more = finish is not None and prep.resumed is None and not out.all_finished
                logprob = out.cumulative_logprob if finish is not None else None
                logprobs = None if out.logprobs is None else self.token_texts.entries(out.logprobs)
                yield DeltaItem(
                    text,
                    tuple(out.new_token_ids),
                    finish,
                    logprobs,
                    index=out.index,
                    more=more,
                    cumulative_logprob=logprob,
                )
                if finish is not None and not more:
                    return
                out = await outputs.__anext__()
        except RequestError as e:  # refused mid-way: its grammar allows no next token
            yield ErrorItem(ErrorKind.INVALID_REQUEST, str(e), e.param or param)
        except EngineStepError as e:
            log.warning("request %s ended by an engine failure: %s", request_id, e)
            yield engine_error_item(e)
        finally:
            self.admitted -= 1
            self.metrics.request_ended(num_tokens, out.metrics if out else None)
            await outputs.aclose()

    def _with_prompt(self, start: StartItem, request: dict[str, Any], out: RequestOutput) -> StartItem:
        """The start item with the prompt's text (`echo`) and logprobs (prompt_logprobs), when asked."""
        ids = start.prompt_token_ids
        text = self.engine.tokenizer.decode(list(ids)) if request.get("echo") else None
        logprobs = None
        if out.prompt_logprobs is not None:
            logprobs = self.token_texts.prompt_entries(ids, out.prompt_logprobs)
        return replace(start, prompt_text=text, prompt_logprobs=logprobs)

    async def ready(self) -> bool:
        """The constructor returned, so the engine is built and has run a step: this replica can serve."""
        return True

    # ---- introspection -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Engine counters plus the block manager's own view (and the draft worker's, if any)."""
        out = {**self.engine.stats(), "num_requests": self.num_requests, "model": self.model_id}
        try:
            out["block_manager"] = self.engine.block_manager_stats()
        except Exception as e:  # noqa: BLE001 - being repaired
            out["block_manager"] = {"error": str(e)}
        if self.draft is not None:
            out["draft_worker"] = self.draft.stats()
        out["speculation"] = [
            {
                "class": key.workload_class,
                "drafter": key.drafter,
                "version": key.version,
                "requests": s.requests,
                "acceptance_rate": round(s.total.acceptance_rate, 4),
                "window_requests": s.window_requests,
                "window_tokens_per_step": round(s.window_tokens_per_step, 4),
                "window_acceptance_by_position": [round(x, 4) for x in s.window_acceptance_by_position()],
            }
            for key, s in self.engine.spec_snapshot().items()
        ]
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

    def __del__(self) -> None:  # Serve calls it when it stops the replica
        self.shutdown()

    def shutdown(self) -> None:
        """Stop publishing metrics (the thread would go on recording into whatever Ray this process joins
        next), the engine loop, the shards and the draft worker. Runs once."""
        if self._shut_down:
            return
        self._shut_down = True
        for thread in (getattr(self, "_publisher", None), getattr(self, "_adapter", None)):
            if thread is not None:
                thread.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if getattr(self, "runner", None) is not None:
            self.runner.shutdown()
        if getattr(self, "draft", None) is not None:
            ray.kill(self.draft.actor, no_restart=True)
