"""What every HTTP request to the ingress passes first: a request id, the API key, the body limit, admission.

The id is the one Serve's proxy put in the request's `x-request-id` header (the proxy echoes it in the
response), or a new one, sent back in that header. A pure ASGI middleware (no Ray), so that it wraps every
route, FastAPI's own (the OpenAPI document) included, and spans a streamed response to its end (an admission
slot is held until the last byte). It also is the last line for errors: an exception no handler answered
becomes a one-line 500 carrying the request id, never a traceback; the details go to the log under that id.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from deployments.admission import InFlightLimit, Refusal
from deployments.auth import ADMIN, INFERENCE, AuthFailure, Caller, KeySource
from deployments.client_watch import watched_receive
from deployments.openai_protocol import ProtocolError

log = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "x-request-id"
OPEN_PATHS = frozenset({"/health"})  # probes
ADMIN_PATHS = frozenset({"/v1/stats", "/metrics", "/openapi.json", "/docs", "/redoc"})
ADMITTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})  # count against the in-flight limit
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestTooLarge(ProtocolError):
    def __init__(self, limit: int):
        super().__init__(
            f"the request body is larger than the limit of {limit} bytes", status_code=413, code="request_too_large"
        )


def server_error(request_id: str, what: str, status: int = 500, code: str = "internal_error") -> ProtocolError:
    """A 5xx in one line that says what failed and names the request (details are in the log)."""
    return ProtocolError(f"{what} (request id {request_id})", status_code=status, type="server_error", code=code)


def refusal_error(refusal: Refusal) -> ProtocolError:
    error = ProtocolError(refusal.message, status_code=refusal.status, type="server_error", code=refusal.code)
    if refusal.status == 429:
        error.type = "rate_limit_error"
    error.retry_after_s = refusal.retry_after_s
    return error


def error_headers(error: ProtocolError) -> dict[str, str]:
    """Retry-After for refusals (429, 503), WWW-Authenticate for 401."""
    headers = {}
    retry = getattr(error, "retry_after_s", None)
    if retry is None and error.status_code in (429, 503):
        retry = 1
    if retry is not None:
        headers["retry-after"] = str(int(retry))
    if error.status_code == 401:
        headers["www-authenticate"] = "Bearer"
    return headers


@dataclass
class EdgeSettings:
    """The ingress's edge policy: `keys` None = no authentication; `limit` None = no in-flight limit."""

    max_body_bytes: int
    keys: KeySource | None = None
    limit: InFlightLimit | None = None


def route_scope(path: str) -> str | None:
    """The scope a path needs: None (open), ADMIN or INFERENCE (everything else)."""
    if path in OPEN_PATHS:
        return None
    return ADMIN if path in ADMIN_PATHS else INFERENCE


class Edge:
    """ASGI middleware; `settings` returns the EdgeSettings (or None: pass through), looked up per request
    because the ingress builds them in its constructor, after the app was made."""

    def __init__(self, app, settings: Callable[[], EdgeSettings | None]):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        given = headers.get(REQUEST_ID_HEADER, "")
        request_id = given if _CLIENT_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if request_id != given:  # a given id is echoed by whoever gave it (Serve's proxy does)
                    header = (REQUEST_ID_HEADER.encode(), request_id.encode())
                    message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        async def answer(error: ProtocolError) -> None:
            body = error.body()
            if error.status_code >= 500 and request_id not in error.message:
                body["error"]["message"] = f"{error.message} (request id {request_id})"
            body = json.dumps(body).encode()
            extra = [(k.encode(), v.encode()) for k, v in error_headers(error).items()]
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": error.status_code,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                    + extra,
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})

        if settings is None:
            await self.app(scope, watched_receive(receive), send_with_id)
            return
        path = _route_path(scope)
        needed = route_scope(path)
        if settings.keys is not None and needed is not None:
            verdict = settings.keys.current().authorize(headers.get("authorization"), needed)
            if isinstance(verdict, AuthFailure):
                await answer(ProtocolError(verdict.message, status_code=verdict.status, code=verdict.code))
                return
            state["caller"] = verdict
        else:
            state["caller"] = Caller("anonymous", frozenset())
        limit = settings.max_body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await answer(RequestTooLarge(limit))
            return
        admitted = settings.limit is not None and path in ADMITTED_PATHS
        if admitted:
            refusal = settings.limit.try_acquire()
            if refusal is not None:
                await answer(refusal_error(refusal))
                return
        seen = 0

        def count(message) -> None:
            nonlocal seen
            if message["type"] == "http.request":
                seen += len(message.get("body") or b"")
                if seen > limit:
                    raise RequestTooLarge(limit)

        try:
            await self.app(scope, watched_receive(receive, count), send_with_id)
        except Exception:  # noqa: BLE001 - the last line: log it all, answer one line
            log.exception("request %s failed", request_id)
            if not started:
                await answer(server_error(request_id, "internal error while answering the request"))
        finally:
            if admitted:
                settings.limit.release()


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path
