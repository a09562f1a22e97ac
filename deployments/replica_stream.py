"""The ingress's side of one request to the target replicas: its stream of items, resumed if its replica dies.

A replica that dies mid-stream (killed, its node lost) breaks the handle's stream with a RayActorError. The
request is then sent again as a resumed request (`resume.Progress`): prompt + output token ids so far, the
rest of the budget, the text already relayed. Serve routes it to a live replica (another one, or the dead
one's replacement); if none has answered within `resume_timeout_s`, the stream ends with an error item.
Cancelling (`cancel()`, idempotent) cancels the replica-side stream, which aborts the request there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayActorError

from deployments.resume import Progress
from deployments.stream_items import DeltaItem, ErrorItem, ErrorKind, StartItem

log = logging.getLogger("ray.serve")

RETRY_PAUSE_S = 0.5
REPLICA_LOST = "the replica serving this request failed and no other replica took it over in time"


MAX_REPLICA_DEATHS = 2  # a request whose replicas keep dying (a prompt that crashes them) is not sent on


def lost_item() -> ErrorItem:
    return ErrorItem(ErrorKind.REPLICA_LOST, REPLICA_LOST, retry_after_s=1)


class ReplicaStream:
    def __init__(self, handle: Any, request: dict[str, Any], resume_timeout_s: float):
        self.handle, self.request, self.resume_timeout_s = handle, request, resume_timeout_s
        self.progress = Progress()
        self._stream: Any = None
        self._done = False
        self._deaths = 0  # replicas that died while serving this request

    async def start(self) -> StartItem | ErrorItem:
        """The first item (start or error); while no item was relayed a dead replica is simply retried."""
        first = await self._open(self.request, deadline=None)
        if first is None:
            first = lost_item()
        if isinstance(first, ErrorItem):
            self._done = True
        else:
            self.progress.prompt_token_ids = list(first.prompt_token_ids)
        return first

    async def items(self) -> AsyncIterator[DeltaItem | ErrorItem]:
        """Delta items up to the one with a finish reason, or an error item last."""
        while not self._done:
            try:
                item = await self._stream.__anext__()
            except StopAsyncIteration:
                self._done = True
                return
            except RayActorError as e:
                log.warning("replica died mid-stream (%s); resuming request %s", type(e).__name__, self._rid())
                self._deaths += 1
                item = await self._resume()
                if not isinstance(item, ErrorItem):
                    continue
            if isinstance(item, ErrorItem) or item.ends_stream:
                self._done = True
            if isinstance(item, DeltaItem):
                self.progress.add(item)
            yield item

    def cancel(self) -> None:
        """Abort the request on its replica (a no-op once it ended)."""
        if not self._done and self._stream is not None:
            self._done = True
            self._stream.cancel()

    # ---- internals ------------------------------------------------------------------------------------

    def _rid(self) -> str:
        return str(self.request.get("request_id", "?"))

    async def _resume(self) -> StartItem | ErrorItem:
        """Send the resumed request; its start item (the caller goes on reading deltas), or an error item."""
        self._stream.cancel()
        several = (self.request.get("params") or {}).get("n", 1) > 1  # n sequences: not resumed (resume.py has one)
        if several or not self.progress.resumable() or self._deaths > MAX_REPLICA_DEATHS:
            return lost_item()
        self.progress.resumes += 1
        request = self.progress.resume_request(self.request)
        request["request_id"] = f"{self._rid()}-resume{self.progress.resumes}"
        try:
            first = await self._open(request, deadline=time.monotonic() + self.resume_timeout_s)
        except Exception:  # noqa: BLE001 - e.g. back pressure: the stream cannot go on
            log.exception("could not resume request %s", self._rid())
            first = None
        return lost_item() if first is None else first

    async def _open(self, request: dict[str, Any], deadline: float | None) -> StartItem | ErrorItem | None:
        """Send `request` and return the replica's first item; a replica that dies first is tried again until
        `deadline` (set at the first death when None). None when no replica answered in time."""
        while True:
            self._stream = self.handle.generate.remote(request)
            try:
                if deadline is None:
                    return await self._stream.__anext__()
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):  # wait_for could swallow a cancel
                    return await self._stream.__anext__()
            except RayActorError as e:
                self._stream.cancel()
                log.warning("replica died before answering request %s (%s)", self._rid(), type(e).__name__)
                self._deaths += 1
                if self._deaths > MAX_REPLICA_DEATHS:
                    return None
                if deadline is None:
                    deadline = time.monotonic() + self.resume_timeout_s
            except (TimeoutError, asyncio.TimeoutError, StopAsyncIteration):
                self._stream.cancel()
                return None
            if time.monotonic() + RETRY_PAUSE_S >= deadline:
                return None
            await asyncio.sleep(RETRY_PAUSE_S)
