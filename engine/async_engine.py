"""Drives an LLMEngine from asyncio: one background thread steps the engine, callers await token streams.

Why a thread: a step is milliseconds to seconds of blocking torch work, and the event loop that serves HTTP
and Ray calls must stay responsive meanwhile (torch releases the GIL inside its kernels). Every engine call
happens on that one thread, so the engine itself needs no locks. A server should also *build* its engine on
that thread (pass a factory): OpenMP keeps a thread team per OS thread that ran torch work, and once a second
thread has one the teams contend for the cores (`scripts/profile_decode.py` measures the cost). A step that
raises (a shard actor died, say) runs the repair hook; when it repairs the fault, the requests in flight are
recomputed from their tokens so far and their streams go on unchanged. Otherwise (or when repairs keep
failing) they end with EngineStepError instead of hanging, and the loop keeps serving new requests.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine failed while this request was in flight; the request was ended, its KV freed."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _deliver(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    """Hand a result to an event loop from the engine thread; a loop that already closed is ignored."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _resolve(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        (fut.set_exception if isinstance(value, BaseException) else fut.set_result)(value)


class AsyncEngine:
    max_repairs = 2  # consecutive failed steps that are repaired before the requests in flight are ended

    def __init__(
        self,
        engine: LLMEngine | Callable[[], LLMEngine],
        on_step_error: Callable[[Exception], bool] | None = None,
    ):
        """`engine`, or a factory that builds it on the engine thread (waited for; its error is raised here).
        `on_step_error` runs on the engine thread after a failed step (e.g. to rebuild shard actors) and
        returns True when it repaired the fault, so the requests in flight can be recomputed."""
        self.on_step_error = on_step_error
        self._failures_in_a_row = 0
        self.num_recoveries = 0
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.num_step_errors = 0
        self.engine: LLMEngine
        built: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(engine, built), name="engine-loop", daemon=True)
        self._thread.start()
        failure = built.get()  # the engine is set (by the thread) once this returns
        if failure is not None:
            raise failure

    # ---- caller side (any event loop) ------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int] | None = None,
        params: SamplingParams | dict | None = None,
        *,
        messages: list[dict] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; a bad request raises RequestError before the first output. Leaving
        the iteration early (a client that went away) aborts the request, freeing its KV blocks."""
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        added: asyncio.Future = loop.create_future()

        def add() -> None:
            try:
                rid = self.engine.add_request(prompt, params, messages=messages, request_id=request_id)
            except Exception as e:  # noqa: BLE001 - the caller gets the exact error
                _deliver(loop, _resolve, added, e)
                return
            self._streams[rid] = stream
            _deliver(loop, _resolve, added, rid)

        self._submit(add)
        rid = await added
        done = False
        try:
            while not done:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finished
                yield item
        finally:
            if not done:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed on the engine thread before the next step."""
        self._submit(lambda: self._abort(request_id))

    def stats(self) -> dict[str, Any]:
        """A racy but cheap snapshot for routing and metrics (plain ints read across threads)."""
        e = self.engine
        return {
            "num_waiting": len(e.scheduler.waiting),
            "num_running": len(e.scheduler.running),
            "free_kv_blocks": e.scheduler.num_free_blocks,
            "total_kv_blocks": e.runner.num_blocks,
            "num_preemptions": e.scheduler.num_preemptions,
            "num_step_errors": self.num_step_errors,
            "num_recoveries": self.num_recoveries,
            "spec_drafted": e.spec.drafted,
            "spec_accepted": e.spec.accepted,
        }

    @property
    def alive(self) -> bool:
        """False once the engine thread has died (a bug, not a failed step: those are caught)."""
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ---- engine thread --------------------------------------------------------------------------------

    def _submit(self, command: Callable[[], None]) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort(request_id)

    def _drain(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            except Exception:  # noqa: BLE001 - e.g. an abort whose block release failed; the next step repairs
                log.exception("engine command failed")

    def _run(self, engine: LLMEngine | Callable[[], LLMEngine], built: queue.SimpleQueue) -> None:
        if callable(engine):
            try:
                engine = engine()
            except BaseException as e:  # noqa: BLE001 - raised in the constructor's thread
                built.put(e)
                return
        self.engine = engine
        built.put(None)
        while not self._stopped:
            self._drain()
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the loop
                self._on_failed_step(e)
                continue
            self._failures_in_a_row = 0
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                _deliver(stream.loop, stream.queue.put_nowait, out)

    def _on_failed_step(self, error: Exception) -> None:
        self.num_step_errors += 1
        self._failures_in_a_row += 1
        repaired = False
        if self.on_step_error is not None:
            try:
                repaired = bool(self.on_step_error(error))
            except Exception:  # noqa: BLE001
                log.exception("repair after a failed step failed too")
        if repaired and self._failures_in_a_row <= self.max_repairs:
            log.warning("engine step failed (%s); repaired, recomputing %d request(s)", error, len(self._streams))
            try:
                self.engine.reset_kv()
            except Exception:  # noqa: BLE001
                log.exception("could not reset the KV state after a repair")
            else:
                self.num_recoveries += 1
                return
        self._fail_in_flight(error)

    def _fail_in_flight(self, error: Exception) -> None:
        log.error("engine step failed; ending %d request(s) in flight", len(self._streams), exc_info=error)
        message = f"engine step failed: {type(error).__name__}: {error}"
        try:
            self.engine.reset_kv()  # first, so that ending the requests below needs no block-manager call
        except Exception:  # noqa: BLE001 - the health check reports a block manager that stays unreachable
            log.exception("could not reset the KV state")
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            _deliver(stream.loop, stream.queue.put_nowait, EngineStepError(message))
        self._streams.clear()
        for rid in list(self.engine.requests):  # requests added without a stream (none in normal use)
            self.engine.abort(rid)
