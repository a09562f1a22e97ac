"""Drives an LLMEngine from asyncio: one background thread steps the engine, callers await token streams.

Why a thread: a step is milliseconds to seconds of blocking torch work, and the event loop that serves HTTP
and Ray calls must stay responsive meanwhile (torch releases the GIL inside its kernels). Every engine call
happens on that one thread, so the engine itself needs no locks. A server should also *build* its engine on
that thread (pass a factory): OpenMP keeps a thread team per OS thread that ran torch work, and once a second
thread has one the teams contend for the cores (`scripts/profile_decode.py` measures the cost). Requests are
tokenized and checked on a third thread (`prepare`, which reads nothing a step changes), so that a long prompt
stalls neither the event loop nor a step.

Failures (the engine's rule is in `engine/llm_engine.py`): a request that fails on its own ends its stream
with RequestFailed and no other stream notices. A step that raises runs the repair hook; when it repairs the
fault (or there is no hook: nothing to rebuild), the engine recomputes the requests in flight, so their
streams go on unchanged, and if the forward keeps failing it isolates the request that breaks it, which then
ends with RequestFailed alone. Only when the hook cannot repair do the requests in flight end, with
EngineStepError, instead of hanging; the loop keeps serving new requests either way. Messages are one line
without internals (the exception and traceback go to the log).

Cancellation: leaving a stream at any point (before the request was even added, while it waits, prefills or
decodes) aborts it on the engine thread, so its KV blocks are freed before the next step.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from engine.llm_engine import LLMEngine, RequestOutput
from engine.spec_monitor import SpecKey, SpecStats
from engine.tokenization import EngineRequest, RequestError
from sampling.params import SamplingParams
from speculator.adaptation import TrafficRecord
from speculator.proposer import Proposer

log = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine failed while this request was in flight; the request was ended, its KV freed."""


class RequestFailed(EngineStepError):
    """This request alone failed (or was aborted) and was ended; the other requests went on."""


STEP_FAILED = "the engine failed and could not recover; the request was ended"
ABORTED = "the request was aborted"


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    request_id: str | None = None  # set on the engine thread once the request is added
    cancelled: bool = False  # set by the caller when it leaves; an add that has not run yet is skipped


def _deliver(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    """Hand a result to an event loop from the engine thread; a loop that already closed is ignored."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine | Callable[[], LLMEngine],
        on_step_error: Callable[[Exception], bool] | None = None,
    ):
        """`engine`, or a factory that builds it on the engine thread (waited for; its error is raised here).
        `on_step_error` runs on the engine thread after a failed step (e.g. to rebuild shard actors) and
        returns True when it repaired the fault (or found nothing broken), so the requests in flight can be
        recomputed; False (or an exception) ends them."""
        self.on_step_error = on_step_error
        self.num_recoveries = 0
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.num_step_errors = 0
        self._inputs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-inputs")  # see `prepare`
        self.engine: LLMEngine
        built: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(engine, built), name="engine-loop", daemon=True)
        self._thread.start()
        failure = built.get()  # the engine is set (by the thread) once this returns
        if failure is not None:
            raise failure

    # ---- caller side (any event loop) ------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        """Prompt + output tokens a request may hold."""
        return self.engine.max_model_len

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (for reading, e.g. to decode a resumed request's tokens)."""
        return self.engine.tokenizer

    async def prepare(
        self,
        prompt: str | list[int] | None = None,
        params: SamplingParams | dict | None = None,
        *,
        messages: list[dict] | None = None,
        fit_context: bool = False,
    ) -> EngineRequest:
        """`LLMEngine.prepare` (tokenize and check once) on the input thread: neither on the caller's event loop
        (a long prompt would stall every other stream) nor on the engine thread (it would stall every step).
        One thread, so tokenizing takes at most one core from the engine. Raises RequestError."""
        call = functools.partial(self.engine.prepare, prompt, params, messages=messages, fit_context=fit_context)
        return await asyncio.get_running_loop().run_in_executor(self._inputs, call)

    async def generate(
        self,
        prompt: str | list[int] | EngineRequest | None = None,
        params: SamplingParams | dict | None = None,
        *,
        messages: list[dict] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (with n > 1, those of its n sequences interleaved, each with its `index`, until
        `all_finished`); `prompt` is an EngineRequest from `prepare`, or is prepared first. A bad
        request raises RequestError before the first output (or later, when its grammar allows no next token),
        a request that failed alone raises RequestFailed,
        one ended by an unrepairable fault EngineStepError. Leaving the iteration at any point (a client that
        went away) aborts the request, freeing its KV blocks."""
        request = prompt if isinstance(prompt, EngineRequest) else await self.prepare(prompt, params, messages=messages)
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())

        def add() -> None:
            if stream.cancelled:
                return
            try:
                rid = self.engine.add_request(request, request_id=request_id)
            except Exception as e:  # noqa: BLE001 - the caller gets the exact error
                _deliver(loop, stream.queue.put_nowait, e)
                return
            stream.request_id = rid
            self._streams[rid] = stream

        done = False
        try:
            self._submit(add)
            while not done:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.all_finished
                yield item
        finally:
            if not done:  # the caller left (cancelled, closed the stream, or raised)
                stream.cancelled = True
                self._submit(lambda: self._abort(stream.request_id, leaving=stream))

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed on the engine thread before the next step, and a stream
        still reading it ends with RequestFailed."""
        self._submit(lambda: self._abort(request_id))

    def block_manager_stats(self) -> dict[str, Any]:
        """The block manager's own counters (`LLMEngine.block_manager_stats`; may raise while it is repaired)."""
        return self.engine.block_manager_stats()

    def spec_snapshot(self) -> dict[SpecKey, SpecStats]:
        """The engine's speculation by workload class, drafter and version (safe from any thread)."""
        return self.engine.spec_snapshot()

    def stats(self) -> dict[str, Any]:
        """A racy but cheap snapshot for routing and metrics: the engine's counters (`LLMEngine.stats`) and this
        loop's."""
        return {**self.engine.stats(), "num_step_errors": self.num_step_errors, "num_recoveries": self.num_recoveries}

    def install_drafter(self, workload_class: str, name: str, proposer: Proposer, version: str) -> None:
        """Swap a class's drafter before the next step (`LLMEngine.install_drafter`)."""
        self.engine.install_drafter(workload_class, name, proposer, version)

    def restore_drafter(self, workload_class: str) -> None:
        self.engine.restore_drafter(workload_class)

    def take_traffic(self) -> list[TrafficRecord]:
        """The sequences the engine logged since the last call (`LLMEngine.log_traffic`)."""
        return self.engine.take_traffic()

    @property
    def alive(self) -> bool:
        """False once the engine thread has died (a bug, not a failed step: those are caught)."""
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._inputs.shutdown(wait=False, cancel_futures=True)
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ---- engine thread --------------------------------------------------------------------------------

    def _submit(self, command: Callable[[], None]) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _abort(self, request_id: str | None, leaving: _Stream | None = None) -> None:
        """Abort a request; a stream still reading it ends with RequestFailed. A caller that is `leaving` aborts
        only its own request, and only if it is still running (it may have ended, or not been added)."""
        stream = self._streams.get(request_id)
        if leaving is not None and (request_id is None or stream is not leaving):
            return
        self._streams.pop(request_id, None)
        self.engine.abort(request_id)
        if stream is not None and leaving is None:
            _deliver(stream.loop, stream.queue.put_nowait, RequestFailed(ABORTED))

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
            self._publish(outputs)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.all_finished:
                del self._streams[out.request_id]
            if out.error is None:
                item = out
            else:  # refused mid-way for its own spec (a 400), or failed alone in the engine
                item = RequestError(out.error, out.error_param) if out.error_param else RequestFailed(out.error)
            _deliver(stream.loop, stream.queue.put_nowait, item)

    def _on_failed_step(self, error: Exception) -> None:
        self.num_step_errors += 1
        log.warning("engine step failed (%s); repairing", type(error).__name__, exc_info=error)
        repaired = True  # without a hook there is nothing to rebuild: recompute, and isolate if it persists
        if self.on_step_error is not None:
            try:
                repaired = bool(self.on_step_error(error))
            except Exception:  # noqa: BLE001
                log.exception("repair after a failed step failed too")
                repaired = False
        if repaired:
            try:
                ended = self.engine.recover()
            except Exception:  # noqa: BLE001
                log.exception("could not recover the engine after a repair")
            else:
                self.num_recoveries += 1
                log.warning("recomputing %d request(s) after a failed step", self.engine.num_requests)
                self._publish(ended)
                self._end_orphaned_streams()
                return
        self._fail_in_flight()

    def _end_orphaned_streams(self) -> None:
        """A stream whose request the engine no longer holds (it finished inside the step that failed, so its
        last output was lost) ends with an error rather than waiting forever."""
        for rid in [rid for rid in self._streams if not self.engine.has_request(rid)]:
            stream = self._streams.pop(rid)
            _deliver(stream.loop, stream.queue.put_nowait, EngineStepError(STEP_FAILED))

    def _fail_in_flight(self) -> None:
        log.error("engine step failed; ending %d request(s) in flight", len(self._streams))
        try:
            self.engine.reset_kv()  # first, so that ending the requests below needs no block-manager call
        except Exception:  # noqa: BLE001 - the health check reports a block manager that stays unreachable
            log.exception("could not reset the KV state")
        for stream in list(self._streams.values()):
            _deliver(stream.loop, stream.queue.put_nowait, EngineStepError(STEP_FAILED))
        self._streams.clear()
        for rid in list(self.engine.requests):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - its blocks go back with the next block step, or the next reset
                log.exception("could not free the blocks of request %s", rid)
