"""The proxy's stream guard: an event stream whose app dies mid-response still ends with an error event and
[DONE], over raw ASGI and over real HTTP through uvicorn; other responses pass through untouched."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import uvicorn
from ray.serve._private.http_util import _apply_middlewares, validate_http_proxy_callback_return

from cluster.local_cluster import free_port
from deployments.proxy_guard import ENV_VAR, IMPORT_PATH, INTERRUPTED_CODE, StreamGuard, middlewares, proxy_env

SSE = [(b"content-type", b"text/event-stream"), (b"x-request-id", b"req-123")]
EVENT = b'data: {"choices": [{"text": "hi"}]}\n\n'


def sse_app(body: list[bytes], end: str):
    """An app that starts an event stream, sends `body` chunks, then ends as `end` says: "ok" (final message),
    "return" (returns without it), "raise" (raises without it)."""

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        for chunk in body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(0)
        if end == "ok":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif end == "raise":
            raise RuntimeError("replica died")

    return app


def run(app, scope_type: str = "http") -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(StreamGuard(app)({"type": scope_type, "method": "POST", "path": "/"}, receive, send))
    return sent


def events(sent: list[dict]) -> list[str]:
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    assert body.endswith("\n\n")
    return [e.removeprefix("data: ") for e in body.split("\n\n") if e]


@pytest.mark.parametrize("end", ["return", "raise"])
def test_cut_stream_gets_error_event_and_done(end):
    sent = run(sse_app([EVENT, EVENT], end))
    assert sent[-1] == {"type": "http.response.body", "body": sent[-1]["body"], "more_body": False}
    got = events(sent)
    assert got[-1] == "[DONE]"
    error = json.loads(got[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == INTERRUPTED_CODE and error["param"] is None
    assert "req-123" in error["message"]
    assert [json.loads(e) for e in got[:2]] == [json.loads(EVENT[6:])] * 2


def test_event_cut_in_half_is_terminated_before_the_error():
    sent = run(sse_app([EVENT, EVENT[:12]], "raise"))
    got = events(sent)
    assert got[1] == EVENT[6:12].decode()  # the half event stays one (unparseable) event, not glued to the error
    assert json.loads(got[2])["error"]["code"] == INTERRUPTED_CODE and got[3] == "[DONE]"


def test_done_already_sent_only_closes_the_body():
    sent = run(sse_app([EVENT, b"data: [DONE]\n\n"], "return"))
    assert events(sent) == [EVENT[6:-2].decode(), "[DONE]"]
    assert sent[-1]["more_body"] is False


def test_complete_stream_passes_through_untouched():
    app = sse_app([EVENT], "ok")
    assert run(app) == [
        {"type": "http.response.start", "status": 200, "headers": SSE},
        {"type": "http.response.body", "body": EVENT, "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]


def test_other_responses_and_errors_are_not_touched():
    async def json_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        raise RuntimeError("boom")

    async def before_start(scope, receive, send):
        raise RuntimeError("boom")

    for app in (json_app, before_start):
        with pytest.raises(RuntimeError, match="boom"):
            run(app)
    assert run(sse_app([EVENT], "return"), scope_type="websocket")[-1]["more_body"] is True  # not HTTP: as is


def test_serve_accepts_the_callback():
    assert proxy_env() == {ENV_VAR: IMPORT_PATH}
    assert ENV_VAR == "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
    from ray._common.utils import import_attr

    (guard,) = validate_http_proxy_callback_return(import_attr(IMPORT_PATH)())
    assert guard.cls is StreamGuard


@pytest.fixture(scope="module")
def http_server():
    """uvicorn serving a dying stream through the guard, wrapped the way Serve's proxy wraps its app."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await sse_app([EVENT], "raise" if scope["path"] == "/raise" else "return")(scope, receive, send)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_apply_middlewares(app, middlewares()), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("path", ["/raise", "/return"])
def test_http_client_reads_a_complete_body(http_server, path):
    with httpx.stream("POST", http_server + path, timeout=10) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]  # an incomplete chunked body would raise here
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == INTERRUPTED_CODE
