"""The ingress: the OpenAI-compatible HTTP ingress in front of the target replicas.

Every request first passes the edge (edge.py: request id, API key, body limit, in-flight admission). The
ingress validates requests (400 with an OpenAI error body, never a 5xx for bad input), answers repeated
deterministic requests from the completion cache shared by all ingress replicas (scoped per API key and
`user`; a cache that is down is a miss), and otherwise streams the request through a DeploymentHandle to an
LLMServer replica chosen by the prefix-affinity request router (replica_stream.py resumes it elsewhere if
that replica dies). The first item of a replica's stream decides the HTTP status, so a request the engine
refuses still gets a proper 4xx (or 503 + Retry-After when overloaded) even when the client asked for a
stream. A client that goes away, at any point, cancels the replica-side stream, which frees the sequence's
KV blocks at once (noticed both by Serve's cancellation and by the ingress itself, client_watch.py). A 5xx
says what failed in one line with the request id; the details go to the log.
"""

import asyncio
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from deployments.admission import InFlightLimit, overloaded
from deployments.app_config import AppConfig, load_app_config
from deployments.auth import Caller, KeySource
from deployments.client_watch import ClientGone, answer_while_connected
from deployments.completion_cache import CachedCompletion, cache_scope, is_cacheable, make_key, replay_pieces
from deployments.edge import Edge, EdgeSettings, error_headers, refusal_error, server_error
from deployments.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    check_model,
    parse_request,
)
from deployments.openai_responses import (
    SSE_DONE,
    SSEEncoder,
    chat_completion_response,
    completion_response,
    model_list,
    new_id,
    sse_event,
    sse_stream,
    usage,
)
from deployments.openapi_doc import install_openapi
from deployments.prompt_batch import (
    batch_response,
    collect_all,
    element_error,
    relay_sse,
    start_all,
    usage_of,
)
from deployments.replica_stream import ReplicaStream
from deployments.routing_policy import prefix_keys
from deployments.serve_metrics import CONTENT_TYPE, IngressMetrics, MetricsRelay
from deployments.stream_items import ErrorItem, ErrorKind, LogprobEntry, StartItem

log = logging.getLogger("ray.serve")
api = FastAPI(title="specserve", docs_url=None, redoc_url=None)


def _edge_settings() -> EdgeSettings | None:
    """The running ingress's edge policy (the middleware is added before the ingress exists)."""
    try:
        return getattr(serve.get_replica_context().servable_object, "edge", None)
    except RayServeException:  # not in a replica
        return None


api.add_middleware(Edge, settings=_edge_settings)


def model_version(config: AppConfig) -> str:
    """Identifies the weights being served: cached completions of any other version are never replayed."""
    path = config.engine.model
    if path is None:
        from model.default_model import default_model_path

        path = str(default_model_path())
    try:
        st = os.stat(path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "?"
    e = config.engine
    blob = f"{os.path.abspath(path)}|{stamp}|{e.dtype}|{e.max_model_len}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


REPLICA_HEADER = "x-specserve-replica"  # which replica answered
CACHE_HIT = {REPLICA_HEADER: "completion-cache"}  # none: the completion cache did
READY_CHECK_S = 2.0  # how long /health waits for a replica to say it is ready
STATS_TIMEOUT_S = 10.0
CLIENT_CLOSED = 499  # the client disconnected before its answer was ready (nginx's code; never sent to anyone)
NOT_READY = ProtocolError(
    "the model is still loading; retry shortly", status_code=503, type="server_error", code="not_ready"
)
NOT_READY.retry_after_s = 5


def _error(e: ProtocolError, request_id: str | None = None) -> JSONResponse:
    """The error response; a 5xx names its request (`request_id`) in its one-line message."""
    body = e.body()
    if e.status_code >= 500 and request_id and request_id not in e.message:
        body["error"]["message"] = f"{e.message} (request id {request_id})"
    return JSONResponse(body, status_code=e.status_code, headers=error_headers(e))


# An error item's kind as HTTP: status and OpenAI error code (a 503 also carries Retry-After).
_ITEM_STATUS = {
    ErrorKind.INVALID_REQUEST: (400, None),
    ErrorKind.OVERLOADED: (503, "overloaded"),
    ErrorKind.ENGINE_FAILED: (503, "engine_error"),
    ErrorKind.REQUEST_FAILED: (500, "request_failed"),
    ErrorKind.REPLICA_LOST: (503, "replica_unavailable"),
}


def item_error(item: ErrorItem, request_id: str) -> ProtocolError:
    """A replica's error item as the client sees it: 4xx as given (it names the field), 5xx in one line with
    the request id (replicas send fixed texts, never exception details)."""
    status, code = _ITEM_STATUS[item.kind]
    if status < 500:
        return ProtocolError(item.message, status_code=status, param=item.param, code=code)
    error = server_error(request_id, item.message, status=status, code=code)
    if item.retry_after_s is not None or status == 503:
        error.retry_after_s = item.retry_after_s or 1
    return error


async def _bounded(response: Any, timeout_s: float) -> Any:
    """Await a DeploymentResponse for at most `timeout_s`; it is cancelled if it does not answer in time."""

    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: before 3.12 it can swallow a cancellation
            return await response
    except BaseException:
        response.cancel()
        raise


class _GuardedStream(StreamingResponse):
    """A streamed response that cancels its replica-side stream however it ends: finished, failed, or cancelled
    before its body generator even started (a client gone right after the status line was decided)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()

    def abandon(self) -> None:
        """The response will never be sent (its client left while it was made): cancel its replica stream."""
        self._on_close()


def _abandon(response: Response) -> None:
    if isinstance(response, _GuardedStream):
        response.abandon()


def _echoed(prompt: str | list[int], first: StartItem) -> tuple[str, tuple[LogprobEntry, ...] | None]:
    """What `echo` puts before a completion: the prompt as sent (a token-id prompt decoded by the replica) and,
    with logprobs, the prompt's (its first token's is null)."""
    return prompt if isinstance(prompt, str) else first.prompt_text or "", first.prompt_logprobs


@serve.ingress(api)
class Ingress:
    """Serve ingress deployment class (options are set in app.py)."""

    def __init__(self, server: DeploymentHandle, app_config: dict[str, Any]):
        self.config = load_app_config(app_config)
        self.model_id = self.config.served_model_name
        self.version = model_version(self.config)
        self.server = server.options(stream=True)
        self.stats_handle = server
        self.metrics = IngressMetrics()
        self.metrics_relay = MetricsRelay()
        self.created = int(time.time())
        install_openapi(api, [self.model_id])  # /openapi.json describes the request bodies
        ingress = self.config.ingress
        auth = ingress.auth
        self.edge = EdgeSettings(
            max_body_bytes=ingress.max_request_bytes,
            keys=KeySource(auth.keys_env, auth.keys_file) if auth.enabled else None,  # no keys: the deploy fails
            limit=InFlightLimit(ingress.admission.max_in_flight, ingress.admission.retry_after_s),
        )
        self.ready = False
        settings = ingress.completion_cache
        self.cache = None
        if settings.enabled:
            from deployments.completion_cache_actor import CacheClient, get_or_create_cache_actor

            def connect():
                actor = get_or_create_cache_actor(
                    max_entries=settings.max_entries, max_bytes=settings.max_bytes, admit_after=settings.admit_after
                )
                # A new model version drops whatever an older deployment of this model left in the shared cache.
                actor.set_model_version.remote(self.model_id, self.version)
                return actor

            self.cache = CacheClient(connect, timeout_s=settings.timeout_s)

    # ---- small endpoints ------------------------------------------------------------------------------

    async def _is_ready(self) -> bool:
        """True once a target replica has answered (its constructor ends only when it can serve); cached."""
        if not self.ready:
            try:
                self.ready = bool(await _bounded(self.stats_handle.ready.remote(), READY_CHECK_S))
            except Exception:  # noqa: BLE001 - no replica yet, or it is starting: not ready
                self.ready = False
        return self.ready

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if not await self._is_ready():
            return _error(NOT_READY, getattr(request.state, "request_id", None))
        return JSONResponse(model_list([self.model_id], created=self.created))

    @api.get("/health")
    async def health(self, request: Request) -> Response:
        if not await self._is_ready():
            return _error(NOT_READY, getattr(request.state, "request_id", None))
        return JSONResponse({"status": "ok", "model": self.model_id})

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        """Ray's metrics export of every node (serve_metrics.py): this app's metrics, Serve's and Ray's."""
        return Response(await self.metrics_relay.scrape(), media_type=CONTENT_TYPE)

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        """Cache and replica counters (what the tests and operators look at); a part that does not answer
        in time is null."""
        cache = await self.cache.stats() if self.cache is not None else None
        try:
            replica = await _bounded(self.stats_handle.stats.remote(), STATS_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - no replica answering: reported as such
            log.warning("replica stats unavailable", exc_info=True)
            replica = None
        limit = self.edge.limit
        return {
            "completion_cache": cache,
            "replica": replica,
            "ingress": {"in_flight": limit.in_flight, "refused": limit.refused},
        }

    # ---- completions ----------------------------------------------------------------------------------

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ChatCompletionRequest, chat=True)

    async def _serve(self, request: Request, schema: type, chat: bool) -> Response:
        route = "chat" if chat else "completions"
        request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex
        self.metrics.in_flight(1)
        try:
            await request.body()  # read before the client is watched (the watch reads what comes after it)
            answer = self._answer(request, schema, chat, request_id)
            response = await answer_while_connected(request.receive, answer, discard=_abandon)
        except ClientGone:
            response = Response(status_code=CLIENT_CLOSED)  # nobody reads it: for the metrics
        except ProtocolError as e:
            response = _error(e, request_id)
        except BackPressureError:
            response = _error(refusal_error(overloaded(self.config.ingress.admission.retry_after_s)), request_id)
        except Exception:  # noqa: BLE001 - a replica failure must still be an OpenAI-shaped answer
            log.exception("request %s failed", request_id)
            response = _error(server_error(request_id, "internal error while answering the request"))
        finally:
            self.metrics.in_flight(-1)
        self.metrics.request(route, response.status_code)
        return response

    async def _answer(self, request: Request, schema: type, chat: bool, request_id: str) -> Response:
        req = parse_request(schema, await request.body())
        check_model(req.model, [self.model_id])
        params = req.sampling_kwargs()
        if req.num_sequences > 1 or (not chat and len(req.prompts) > 1):  # never cached
            return await self._answer_batch(req, params, request_id, chat)
        prompt = req.engine_prompt()
        echo = not chat and req.echo
        engine_request = {
            **prompt,
            "params": params,
            "request_id": f"{request_id}-{uuid.uuid4().hex[:8]}",
            "prefix_keys": prefix_keys(prompt.get("messages") or prompt.get("prompt")),
            **({"echo": True} if echo else {}),
        }
        rid = new_id("chatcmpl" if chat else "cmpl")
        key = None
        if self.cache is not None and is_cacheable(params) and not echo:
            caller = getattr(request.state, "caller", None) or Caller("anonymous", frozenset())
            scope = cache_scope(caller.key_id, req.user, self.config.ingress.completion_cache.share_across_keys)
            key = make_key(self.model_id, self.version, {"chat": chat, **prompt, **params}, scope=scope)
            cached = await self.cache.get(key)
            self.metrics.cache_lookup("hit" if cached is not None else "miss")
            if cached is not None:
                return self._replay(cached, req, rid, chat)
        stream = ReplicaStream(self.server, engine_request, self.config.ingress.resume_timeout_s)
        handed_over = False
        try:
            first = await stream.start()
            if isinstance(first, ErrorItem):
                raise item_error(first, request_id)
            prompt_tokens = first.prompt_tokens
            served_by = {REPLICA_HEADER: first.replica}
            echoed = _echoed(req.prompts[0], first) if echo else None
            if req.stream:
                events = self._sse(stream, req, rid, chat, prompt_tokens, key, request_id, echoed)
                response = _GuardedStream(events, stream.cancel, media_type="text/event-stream", headers=served_by)
                handed_over = True
                return response
            text, token_ids, finish = [], [], None
            logprobs: list[LogprobEntry] | None = [] if params.get("logprobs") is not None else None
            async for item in stream.items():
                if isinstance(item, ErrorItem):
                    raise item_error(item, request_id)
                text.append(item.text)
                token_ids.extend(item.token_ids)
                finish = item.finish_reason or finish
                if logprobs is not None:
                    logprobs.extend(item.logprobs or ())
        finally:
            if not handed_over:
                stream.cancel()
        done = CachedCompletion("".join(text), tuple(token_ids), finish, prompt_tokens, len(token_ids))
        self._offer(key if not stream.progress.resumes else None, done)
        build = chat_completion_response if chat else completion_response
        shown, shown_logprobs = done.text, None if logprobs is None else tuple(logprobs)
        if echoed is not None:
            shown = echoed[0] + shown
            shown_logprobs = None if logprobs is None else (*(echoed[1] or ()), *logprobs)
        body = build(rid, self.model_id, shown, finish, done.usage, created=int(time.time()), logprobs=shown_logprobs)
        return JSONResponse(body, headers=served_by)

    async def _answer_batch(self, req, params: dict, request_id: str, chat: bool) -> Response:
        """Several choices (prompt_batch.py): several prompts, or n / best_of sequences of each; a replica stream
        per prompt; the cache is not asked."""
        prompts = [req.engine_prompt()] if chat else [{"prompt": prompt} for prompt in req.prompts]
        echo = not chat and req.echo
        streams = [
            ReplicaStream(
                self.server,
                {
                    **prompt,
                    "params": params,
                    "request_id": f"{request_id}-{i}-{uuid.uuid4().hex[:8]}",
                    "prefix_keys": prefix_keys(prompt.get("messages") or prompt.get("prompt")),
                    **({"echo": True} if echo else {}),
                },
                self.config.ingress.resume_timeout_s,
            )
            for i, prompt in enumerate(prompts)
        ]
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())

        def to_error(item: ErrorItem) -> ProtocolError:
            return item_error(item, request_id)

        def on_error(error: Exception) -> ProtocolError:
            log.error("stream of request %s failed", request_id, exc_info=error)
            return server_error(request_id, "internal error while streaming the answer")

        def cancel_all() -> None:
            for stream in streams:
                stream.cancel()

        handed_over = False
        try:
            firsts = await start_all(streams)
            for i, first in enumerate(firsts):
                if isinstance(first, ErrorItem):
                    raise element_error(to_error(first), i if len(firsts) > 1 else None)
            prompt_tokens = [first.prompt_tokens for first in firsts]
            served_by = {REPLICA_HEADER: ",".join(sorted({first.replica for first in firsts}))}
            echoes = [_echoed(prompt, first) for prompt, first in zip(req.prompts, firsts)] if echo else None
            if req.stream:
                events = relay_sse(
                    streams,
                    prompt_tokens,
                    id=rid,
                    model=self.model_id,
                    created=created,
                    include_usage=req.include_usage,
                    to_error=to_error,
                    on_error=on_error,
                    on_usage=lambda u: self.metrics.completion_tokens(u["completion_tokens"]),
                    n=req.n,
                    chat=chat,
                    echoes=echoes,
                )
                response = _GuardedStream(events, cancel_all, media_type="text/event-stream", headers=served_by)
                handed_over = True
                return response
            wants_logprobs = params.get("logprobs") is not None
            choices = await collect_all(streams, to_error, req.num_sequences, req.n, wants_logprobs, echoes)
        finally:
            if not handed_over:
                cancel_all()
        total = usage_of(prompt_tokens, choices)
        self.metrics.completion_tokens(total["completion_tokens"])
        body = batch_response(rid, self.model_id, choices, total, created, chat=chat)
        return JSONResponse(body, headers=served_by)

    def _offer(self, key, done: CachedCompletion) -> None:
        self.metrics.completion_tokens(done.completion_tokens)
        if key is not None and done.finish_reason is not None:
            self.cache.offer(key, done)

    def _replay(self, cached: CachedCompletion, req, rid: str, chat: bool) -> Response:
        self.metrics.completion_tokens(cached.completion_tokens)
        if req.stream:
            events = sse_stream(
                replay_pieces(cached),
                id=rid,
                model=self.model_id,
                chat=chat,
                include_usage=req.include_usage,
                final_usage=cached.usage,
            )
            return StreamingResponse(iter(events), media_type="text/event-stream", headers=CACHE_HIT)
        build = chat_completion_response if chat else completion_response
        body = build(rid, self.model_id, cached.text, cached.finish_reason, cached.usage, created=int(time.time()))
        return JSONResponse(body, headers=CACHE_HIT)

    async def _sse(
        self,
        stream: ReplicaStream,
        req,
        rid: str,
        chat: bool,
        prompt_tokens: int,
        key,
        request_id: str,
        echoed: tuple[str, tuple[LogprobEntry, ...] | None] | None = None,
    ) -> AsyncIterator[str]:
        """Relay the replica's stream as SSE; it ends with a finish reason, or an error event, then [DONE]; an
        echoed prompt (text, logprobs) is the first piece. If the client goes away this generator is closed, and
        closing cancels the replica-side stream, which aborts the request and frees its KV blocks."""
        sse = SSEEncoder(rid, self.model_id, chat, int(time.time()), req.include_usage)
        text, token_ids, finish = [], [], None
        completed = False
        try:
            for event in sse.start():
                yield event
            if echoed is not None:
                for event in sse.piece(echoed[0], None, echoed[1]):
                    yield event
            try:
                async for item in stream.items():
                    if isinstance(item, ErrorItem):
                        yield sse_event(item_error(item, request_id).body())
                        yield SSE_DONE
                        completed = True
                        return
                    text.append(item.text)
                    token_ids.extend(item.token_ids)
                    finish = item.finish_reason or finish
                    for event in sse.piece(item.text, item.finish_reason, item.logprobs):
                        yield event
            except Exception:  # noqa: BLE001 - the stream must still end with an error event
                log.exception("stream of request %s failed", request_id)
                yield sse_event(server_error(request_id, "internal error while streaming the answer").body())
                yield SSE_DONE
                completed = True
                return
            for event in sse.end(usage(prompt_tokens, len(token_ids))):
                yield event
            completed = True
            done = CachedCompletion("".join(text), tuple(token_ids), finish, prompt_tokens, len(token_ids))
            self._offer(key if not stream.progress.resumes else None, done)
        finally:
            if not completed:
                stream.cancel()
