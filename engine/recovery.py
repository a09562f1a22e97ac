"""How the engine lives through failures.

Failures, the rule: one request never takes another down.
- After the forward, each sequence is postprocessed on its own (probabilities, verification, appending
  tokens, detokenization, stop checks). An exception there ends THAT request: its output says
  `finish_reason="error"` with a one-line `error` (the details go to the log), its KV and proposer state are
  freed, and every other sequence's output of the step is delivered as usual.
- A step that raises before that (block-manager call, proposer, forward) cannot be pinned on one request.
  `step` raises; the driver repairs the actors, then calls `recover`: the failure is counted against every
  sequence the step involved, and all requests in flight are recomputed from their tokens so far.
- A sequence that took part in more than MAX_FAILED_STEPS failed steps without sampling a token in between
  may be breaking the forward itself. Then the requests in flight are isolated: they run one at a time, the
  others held back without KV, each until it has sampled a token alone. A sequence whose solo steps fail
  SOLO_TRIES times is the culprit and ends alone (finish_reason "error"); the others go back to batching.
  Requests that arrive meanwhile wait with the held ones.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

from engine.request_state import RequestOutput, RequestState, seq_key
from engine.sequence import SeqStatus, Sequence

if TYPE_CHECKING:
    from engine.scheduler import Scheduler
    from speculator.proposer import Proposer

# One-line reasons for a request the engine ended (the exception itself goes to the log).
SEQUENCE_FAILED = "the engine failed while producing this request's tokens; the request was ended"
BREAKS_FORWARD = "this request made the model's forward pass fail repeatedly; the request was ended"
MAX_FAILED_STEPS = 2  # failed steps (each repaired and recomputed) a sequence may take part in before isolation
SOLO_TRIES = 2  # failed solo steps that make a sequence the culprit (one retry after a repair)

log = logging.getLogger(__name__)


class Recovery:
    """Recovery and isolation, mixed into LLMEngine (whose requests, scheduler and proposer it works on).
    Isolating: the head suspect is the only sequence in the scheduler; the other suspects and the held
    sequences wait outside it, without KV."""

    requests: dict[str, RequestState]
    scheduler: Scheduler
    proposer: Proposer | None
    _suspects: deque[Sequence]
    _held: list[Sequence]
    _in_step: list[Sequence] | None  # the sequences the running step involves (blamed if it fails); None: all

    def reset_kv(self) -> None: ...

    def _fail(self, req: RequestState, message: str) -> RequestOutput: ...

    def _take_ended(self) -> list[RequestOutput]: ...

    @property
    def isolating(self) -> bool:
        return bool(self._suspects)

    def recover(self) -> list[RequestOutput]:
        """After `step` raised and the driver repaired what was broken: blame the step's sequences, recompute
        every request in flight, and isolate or end a request that keeps breaking the forward. Returns the
        outputs of the requests it ended (finish_reason "error")."""
        blamed = self._in_step if self._in_step is not None else [*self.scheduler.running, *self.scheduler.waiting]
        for seq in blamed:
            seq.num_failed_steps += 1
        self._in_step = []
        self.reset_kv()
        if self._suspects:
            if self._suspects[0].num_failed_steps < SOLO_TRIES:
                return []
            seq = self._suspects.popleft()
            log.error("request %s broke %d solo forward steps; ending it", seq.request_id, seq.num_failed_steps)
            out = self._fail(self.requests[seq.request_id], BREAKS_FORWARD)
            self._test_next_suspect()
            return [out, *self._take_ended()]
        if any(r.seq.num_failed_steps > MAX_FAILED_STEPS for r in self.requests.values()):
            log.error("the forward keeps failing: running the %d request(s) in flight alone", len(self.requests))
            self._isolate()
        return []

    def _isolate(self) -> None:
        """Every sequence is waiting and holds no KV (after reset_kv): make them all suspects."""
        for req in self.requests.values():
            req.seq.num_failed_steps = 0
        self._suspects.extend(self.scheduler.waiting)
        self.scheduler.waiting.clear()
        self._test_next_suspect()

    def _test_next_suspect(self) -> None:
        """Schedule the next suspect alone; with none left, the held sequences go back in arrival order."""
        if self._suspects:
            self.scheduler.add(self._suspects[0])
            return
        for seq in sorted(self._held, key=lambda s: s.arrival):
            self.scheduler.add(seq)
        self._held.clear()

    def _after_isolated_step(self, outputs: list[RequestOutput]) -> None:
        """The suspect under test is cleared once it has sampled a token (or ended) in a step of its own."""
        seq = self._suspects[0]
        sampled = any(seq_key(o.request_id, o.index) == seq.request_id for o in outputs)
        if seq.status is not SeqStatus.FINISHED and not sampled:
            return  # still prefilling in chunks
        self._suspects.popleft()
        if seq.status is not SeqStatus.FINISHED:  # hold it back: its KV goes, it is recomputed afterwards
            self.scheduler.finish(seq)
            if self.proposer:
                self.proposer.release(seq.seq_id)
            seq.status, seq.num_computed = SeqStatus.WAITING, 0
            self._held.append(seq)
        self._test_next_suspect()

    def _forget_isolated(self, seq: Sequence) -> None:
        """An aborted sequence leaves the isolation queues (the head's place goes to the next suspect)."""
        if seq in self._held:
            self._held.remove(seq)
        elif self._suspects and self._suspects[0] is seq:
            self._suspects.popleft()
            self._test_next_suspect()
        elif seq in self._suspects:
            self._suspects.remove(seq)
