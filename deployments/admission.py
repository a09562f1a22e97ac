"""Admission control: refuse work that cannot start soon, at once and with `Retry-After`, instead of queueing it.

What bounds an admitted request's latency: a replica runs at most `target.max_ongoing_requests` requests
(Serve), a ingress queues at most `target.max_queued_requests` more for the replicas (Serve answers beyond
with BackPressureError, turned into 503), and a ingress replica answers at most `ingress.admission.max_in_flight`
at once (429 beyond). Inside a replica, requests that would wait beyond the engine's free batch slots are
limited to `target.admission.max_waiting`, and a prompt that does not fit the free KV blocks while the engine
is busy is refused rather than preempting the running ones (503). So an admitted request waits for at most
(queued + waiting) / running request lifetimes before it runs at full batch.

Plain Python: the ingress and the replica call it; no Ray, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Refusal:
    """An OpenAI-shaped refusal: 429 (this ingress is full) or 503 (the replicas are)."""

    status: int
    message: str
    code: str
    retry_after_s: int


def overloaded(retry_after_s: int, message: str = "the server is overloaded; retry later") -> Refusal:
    return Refusal(503, message, "overloaded", retry_after_s)


class InFlightLimit:
    """A ingress replica answers at most `limit` requests at once; one more gets 429 at once."""

    def __init__(self, limit: int, retry_after_s: int = 1):
        if limit < 1 or retry_after_s < 1:
            raise ValueError("limit and retry_after_s must be >= 1")
        self.limit, self.retry_after_s = limit, retry_after_s
        self.in_flight = 0
        self.refused = 0

    def try_acquire(self) -> Refusal | None:
        if self.in_flight >= self.limit:
            self.refused += 1
            return Refusal(429, "too many requests in flight; retry later", "rate_limit_exceeded", self.retry_after_s)
        self.in_flight += 1
        return None

    def release(self) -> None:
        if self.in_flight <= 0:
            raise RuntimeError("release without a matching acquire")
        self.in_flight -= 1


class ReplicaAdmission:
    """A replica's check before it hands a request to its engine, from the engine's stats snapshot."""

    def __init__(
        self,
        max_waiting: int,
        min_free_kv_fraction: float,
        block_size: int,
        max_num_seqs: int,
        retry_after_s: int = 1,
    ):
        if max_waiting < 0 or not 0.0 <= min_free_kv_fraction < 1.0 or min(block_size, max_num_seqs) < 1:
            raise ValueError("max_waiting >= 0, min_free_kv_fraction in [0, 1), block_size and max_num_seqs >= 1")
        if retry_after_s < 1:
            raise ValueError("retry_after_s must be >= 1")
        self.max_waiting, self.min_free_kv_fraction = max_waiting, min_free_kv_fraction
        self.block_size, self.max_num_seqs, self.retry_after_s = block_size, max_num_seqs, retry_after_s

    def check(self, stats: dict[str, Any], prompt_tokens: int, admitted: int) -> Refusal | None:
        """`stats`: AsyncEngine.stats(); `admitted`: requests this replica already handed to its engine and not
        yet finished (the engine learns of a request a moment after it is handed over, so its own waiting
        count lags in a burst)."""
        running = int(stats.get("num_running", 0))
        waiting = max(int(stats.get("num_waiting", 0)), admitted - running)
        # those that would still wait once the free batch slots are filled: this one would wait behind them
        queued = waiting - max(0, self.max_num_seqs - running)
        if queued >= self.max_waiting:
            return overloaded(self.retry_after_s, "the server is overloaded (request queue full); retry later")
        if running:
            needed = -(-(prompt_tokens + 1) // self.block_size)
            total = int(stats.get("total_kv_blocks", 0))
            free = int(stats.get("free_kv_blocks", 0))
            if free - needed < self.min_free_kv_fraction * total:
                return overloaded(self.retry_after_s, "the server is overloaded (KV cache full); retry later")
        return None
