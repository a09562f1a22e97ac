"""The router: the OpenAI-compatible HTTP ingress in front of the target replicas.

It validates requests (400 with an OpenAI error body, never a 5xx for bad input), answers repeated
deterministic requests from the completion cache shared by all router replicas (without touching a replica),
and otherwise streams the request through a DeploymentHandle to an LLMServer replica chosen by the prefix-
affinity request router. The first item of a replica's stream decides the HTTP status, so a request the engine
refuses still gets a proper 4xx even when the client asked for a stream. A client that goes away cancels the
replica-side stream, which frees the sequence's KV blocks at once.
"""

import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter as ServeCounter

from deployments.app_config import AppConfig, load_app_config
from deployments.completion_cache import CachedCompletion, is_cacheable, make_key, replay_pieces
from deployments.openai_protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    SSEEncoder,
    chat_completion_response,
    check_model,
    completion_response,
    error_body,
    model_list,
    new_id,
    parse_request,
    sse_event,
    sse_stream,
    usage,
)
from deployments.routing_policy import prefix_keys

log = logging.getLogger("ray.serve")
api = FastAPI(title="specserve", docs_url=None, redoc_url=None)


def model_version(config: AppConfig) -> str:
    """Identifies the weights being served: cached completions of any other version are never replayed."""
    path = config.engine.model
    if path is None:
        from engine.default_model import default_model_path

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


def _error(e: ProtocolError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status_code)


class _Metrics:
    """Prometheus counters for GET /metrics, mirrored into Ray's metrics through ray.serve.metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "specserve_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.cache = Counter(
            "specserve_completion_cache", "completion cache lookups", ["result"], registry=self.registry
        )
        self.tokens = Counter("specserve_generated_tokens", "completion tokens returned", registry=self.registry)
        self.in_flight = Gauge("specserve_requests_in_flight", "requests being answered", registry=self.registry)
        self.ray_requests = ServeCounter("specserve_requests", "HTTP requests", tag_keys=("route", "status"))
        self.ray_cache = ServeCounter("specserve_completion_cache", "completion cache lookups", tag_keys=("result",))

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()
        self.ray_requests.inc(tags={"route": route, "status": str(status)})

    def cache_lookup(self, result: str) -> None:
        self.cache.labels(result).inc()
        self.ray_cache.inc(tags={"result": result})


@serve.ingress(api)
class Router:
    """Serve ingress deployment class (options are set in app.py)."""

    def __init__(self, server: DeploymentHandle, app_config: dict[str, Any]):
        self.config = load_app_config(app_config)
        self.model_id = self.config.served_model_name
        self.version = model_version(self.config)
        self.server = server.options(stream=True)
        self.stats_handle = server
        self.metrics = _Metrics()
        self.created = int(time.time())
        settings = self.config.router.completion_cache
        self.cache = None
        if settings.enabled:
            from deployments.completion_cache_actor import get_or_create_cache_actor

            self.cache = get_or_create_cache_actor(
                max_entries=settings.max_entries, max_bytes=settings.max_bytes, admit_after=settings.admit_after
            )
            # A new model version drops whatever an older deployment of this model left in the shared cache.
            self.cache.set_model_version.remote(self.model_id, self.version)

    # ---- small endpoints ------------------------------------------------------------------------------

    @api.get("/v1/models")
    async def models(self) -> dict:
        return model_list([self.model_id], created=self.created)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_id}

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        return PlainTextResponse(generate_latest(self.metrics.registry).decode(), media_type="text/plain")

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        """Cache and replica counters (what the tests and operators look at)."""
        cache = await self.cache.stats.remote() if self.cache is not None else None
        replica = await self.stats_handle.stats.remote()
        return {"completion_cache": cache, "replica": replica}

    # ---- completions ----------------------------------------------------------------------------------

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ChatCompletionRequest, chat=True)

    async def _serve(self, request: Request, schema: type, chat: bool) -> Response:
        route = "chat" if chat else "completions"
        self.metrics.in_flight.inc()
        try:
            response = await self._answer(request, schema, chat)
        except ProtocolError as e:
            response = _error(e)
        except BackPressureError:
            response = _error(
                ProtocolError(
                    "the server is overloaded; retry later", status_code=503, type="server_error", code="overloaded"
                )
            )
        except Exception as e:  # noqa: BLE001 - a replica failure must still be an OpenAI-shaped answer
            log.exception("request failed")
            response = _error(
                ProtocolError(f"internal error: {type(e).__name__}: {e}", status_code=500, type="server_error")
            )
        finally:
            self.metrics.in_flight.dec()
        self.metrics.request(route, response.status_code)
        return response

    async def _answer(self, request: Request, schema: type, chat: bool) -> Response:
        req = parse_request(schema, await request.body())
        check_model(req.model, [self.model_id])
        params = req.sampling_kwargs()
        prompt = req.engine_prompt()
        engine_request = {
            **prompt,
            "params": params,
            "request_id": uuid.uuid4().hex,
            "prefix_keys": prefix_keys(prompt.get("messages") or prompt.get("prompt")),
        }
        rid = new_id("chatcmpl" if chat else "cmpl")
        key = None
        if self.cache is not None and is_cacheable(params):
            key = make_key(self.model_id, self.version, {"chat": chat, **prompt, **params})
            cached = await self.cache.get.remote(key)
            self.metrics.cache_lookup("hit" if cached is not None else "miss")
            if cached is not None:
                return self._replay(cached, req, rid, chat)
        stream = self.server.generate.remote(engine_request)
        first = await stream.__anext__()
        if first["type"] == "error":
            stream.cancel()
            raise ProtocolError(
                first["message"],
                status_code=first["status"],
                param=first.get("param"),
                type="invalid_request_error" if first["status"] < 500 else "server_error",
            )
        prompt_tokens = first["prompt_tokens"]
        served_by = {REPLICA_HEADER: first.get("replica", "")}
        if req.stream:
            return StreamingResponse(
                self._sse(stream, req, rid, chat, prompt_tokens, key), media_type="text/event-stream", headers=served_by
            )
        text, token_ids, finish = [], [], None
        async for item in stream:
            if item["type"] == "error":
                raise ProtocolError(item["message"], status_code=item["status"], type="server_error")
            text.append(item["text"])
            token_ids.extend(item["token_ids"])
            finish = item["finish_reason"] or finish
        done = CachedCompletion("".join(text), tuple(token_ids), finish, prompt_tokens, len(token_ids))
        self._offer(key, done)
        build = chat_completion_response if chat else completion_response
        body = build(rid, self.model_id, done.text, finish, done.usage, created=int(time.time()))
        return JSONResponse(body, headers=served_by)

    def _offer(self, key, done: CachedCompletion) -> None:
        self.metrics.tokens.inc(done.completion_tokens)
        if key is not None and done.finish_reason is not None:
            self.cache.offer.remote(key, done)

    def _replay(self, cached: CachedCompletion, req, rid: str, chat: bool) -> Response:
        self.metrics.tokens.inc(cached.completion_tokens)
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

    async def _sse(self, stream, req, rid: str, chat: bool, prompt_tokens: int, key) -> AsyncIterator[str]:
        """Relay the replica's stream as SSE. If the client goes away this generator is closed, and closing
        cancels the replica-side stream, which aborts the request and frees its KV blocks."""
        sse = SSEEncoder(rid, self.model_id, chat, int(time.time()), req.include_usage)
        text, token_ids, finish = [], [], None
        completed = False
        try:
            for event in sse.start():
                yield event
            async for item in stream:
                if item["type"] == "error":
                    yield sse_event(error_body(item["message"], type="server_error"))
                    yield SSE_DONE
                    completed = True
                    return
                text.append(item["text"])
                token_ids.extend(item["token_ids"])
                finish = item["finish_reason"] or finish
                for event in sse.piece(item["text"], item["finish_reason"]):
                    yield event
            for event in sse.end(usage(prompt_tokens, len(token_ids))):
                yield event
            completed = True
            self._offer(key, CachedCompletion("".join(text), tuple(token_ids), finish, prompt_tokens, len(token_ids)))
        finally:
            if not completed:
                stream.cancel()
