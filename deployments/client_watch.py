"""Noticing, in the ingress itself, that a client went away.

Serve's proxy cancels the ingress's call when its client disconnects, and that cancellation is what aborts the
request on its replica. A streamed response also listens for the disconnect itself (Starlette's
StreamingResponse reads `receive`), so a cancellation that is late or lost still ends it; an answer being
prepared (before the status line) or collected whole (`stream: false`) had no such second path: a lost
cancellation left its replica generating to `max_tokens` for nobody. `answer_while_connected` gives them one.
`watched_receive` makes a disconnect stick: Serve's `receive` raises once when the proxy has already dropped
the request, then blocks, so whoever listened second would wait forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

Receive = Callable[[], Awaitable[dict[str, Any]]]
T = TypeVar("T")

DISCONNECT = {"type": "http.disconnect"}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def watched_receive(receive: Receive, on_message: Callable[[dict[str, Any]], None] | None = None) -> Receive:
    """`receive` that, once the client is gone (a disconnect message, or `receive` raising because the proxy
    dropped the request), answers `http.disconnect` at once to every later call. `on_message` sees each
    message first (and may raise, as the body limit does)."""
    gone = False

    async def call() -> dict[str, Any]:
        nonlocal gone
        if gone:
            return DISCONNECT
        try:
            message = await receive()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - e.g. TaskCancelledError: the proxy no longer has this request
            gone = True
            return DISCONNECT
        if message["type"] == "http.disconnect":
            gone = True
        elif on_message is not None:
            on_message(message)
        return message

    return call


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client is gone. Call it only after the request body was read: it consumes messages."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def answer_while_connected(receive: Receive, answer: Awaitable[T]) -> T:
    """`answer`'s result, unless the client disconnects first: then `answer` is cancelled (its own cleanup
    cancels its replica streams) and ClientGone is raised. The body must have been read already."""
    task = asyncio.ensure_future(answer)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):  # let its cleanup run before returning
                await task
    if task.cancelled():
        raise ClientGone
    return task.result()
