"""Noticing, in the ingress itself, that a client went away.

Serve's proxy cancels the ingress's call when its client disconnects, and that cancellation is what aborts the
request on its replica. A streamed response also listens for the disconnect itself (Starlette's
StreamingResponse reads `receive`), so a cancellation that is late or lost still ends it; an answer being
prepared (before the status line) or collected whole (`stream: false`) had no such second path: a lost
cancellation left its replica generating to `max_tokens` for nobody. `answer_while_connected` gives them one.
An abandoned answer must not finish unseen either: a cancellation that meets an awaited call failing at the
same moment can come out as that call's error (`asyncio.wait_for` before Python 3.12 does so, and Ray cancels a
request's child calls as it cancels the request), so the answer goes on and opens a replica stream nobody
reads; `discard` frees it. `watched_receive` makes a disconnect stick: Serve's `receive` raises once when the
proxy has already dropped the request, then blocks, so whoever listened second would wait forever.
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


async def answer_while_connected(
    receive: Receive, answer: Awaitable[T], discard: Callable[[T], None] = lambda _: None
) -> T:
    """`answer`'s result, unless the client disconnects (or the caller is cancelled) first: then `answer` is
    cancelled (its own cleanup cancels its replica streams) and ClientGone is raised. An answer that finishes
    anyway (something under it took the cancellation for an ordinary error) is handed to `discard`, which frees
    what it holds: nobody will send it. The body must have been read already."""
    task = asyncio.ensure_future(answer)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    abandoned = False
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            abandoned = True
            task.add_done_callback(lambda t: _discard(t, discard))
            task.cancel()
            with contextlib.suppress(BaseException):  # let its cleanup run before returning
                await task
    if abandoned:
        raise ClientGone
    return task.result()


def _discard(task: asyncio.Future, discard: Callable[[Any], None]) -> None:
    if not task.cancelled() and task.exception() is None:
        discard(task.result())
