"""An ASGI middleware for Ray Serve's HTTP proxy: a Server-Sent Events stream always ends properly.

When the ingress replica dies after a response has started, Ray Serve's proxy just stops
sending (`send_http_response_on_exception` sends nothing once a response started): the client sees HTTP 200
and a chunked body cut off with no error and no `[DONE]`. Serve loads middlewares into every proxy from the
function named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH; with `middlewares` below there, an event stream
whose app returns or raises before its final body message gets an OpenAI-shaped error event
(code `stream_interrupted`) and `data: [DONE]`, and its body is closed properly.

The variable must be in the environment of the processes that start Ray (the proxy is a Ray worker and
inherits it): `proxy_env()` gives it to whoever starts a cluster here; cluster/README.md shows it for
`ray start` and KubeRay.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from starlette.middleware import Middleware

from deployments.openai_protocol import (
    error_body,
)
from deployments.openai_responses import (
    SSE_DONE,
    sse_event,
)

log = logging.getLogger(__name__)

ENV_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
IMPORT_PATH = "deployments.proxy_guard:middlewares"
INTERRUPTED_CODE = "stream_interrupted"
_DONE = SSE_DONE.encode()


def proxy_env() -> dict[str, str]:
    """Environment for `ray start` / `ray.init` that loads the guard into Serve's proxies."""
    return {ENV_VAR: IMPORT_PATH}


def middlewares() -> list[Middleware]:
    """Serve's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(StreamGuard)]


def interrupted_event(request_id: str | None) -> bytes:
    where = f" (request id {request_id})" if request_id else ""
    message = f"the stream was interrupted by a server fault{where}; retry the request"
    return sse_event(error_body(message, type="server_error", code=INTERRUPTED_CODE)).encode()


class _Response:
    """What the app has sent so far of one HTTP response."""

    def __init__(self) -> None:
        self.event_stream = False
        self.complete = False
        self.request_id: str | None = None
        self.tail = b""  # the last bytes of the body: is an event cut in half, was [DONE] already sent?

    def see(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = {k.lower(): v for k, v in message.get("headers", [])}
            self.event_stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            self.request_id = headers.get(b"x-request-id", b"").decode("latin-1") or None
        elif message["type"] == "http.response.body":
            self.tail = (self.tail + message.get("body", b""))[-len(_DONE) :]
            self.complete = not message.get("more_body", False)

    @property
    def cut_off(self) -> bool:
        return self.event_stream and not self.complete

    def ending(self) -> bytes:
        """The bytes that end this stream the way an OpenAI stream ends."""
        if self.tail.endswith(_DONE):
            return b""
        partial = b"\n\n" if self.tail and not self.tail.endswith(b"\n\n") else b""
        return partial + interrupted_event(self.request_id) + _DONE


class StreamGuard:
    """Pure ASGI middleware (no buffering: each message is passed on as it comes)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = _Response()

        async def watched(message: dict[str, Any]) -> None:
            response.see(message)
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            if not response.cut_off:
                raise
            log.warning("event stream %s failed mid-response; ending it", response.request_id, exc_info=True)
        else:
            if not response.cut_off:
                return
            log.warning("event stream %s ended without its last message; ending it", response.request_id)
        with contextlib.suppress(Exception):  # the client may be gone already
            await send({"type": "http.response.body", "body": response.ending(), "more_body": False})
