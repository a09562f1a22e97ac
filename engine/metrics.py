"""Speculation and latency metrics, per request and in aggregate."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class SpecCounters:
    """Drafted/accepted counts; `accepted_per_pos[j]` = verification steps whose draft j was accepted."""

    steps: int = 0  # verification steps (decode steps of a sequence, speculative or not)
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens produced by those steps (accepted + one bonus or recovered each)
    accepted_per_pos: list[int] = field(default_factory=list)
    drafted_per_pos: list[int] = field(default_factory=list)

    def record(self, drafted: int, accepted: int, emitted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.emitted += emitted
        for counts, n in ((self.drafted_per_pos, drafted), (self.accepted_per_pos, accepted)):
            if len(counts) < n:
                counts.extend([0] * (n - len(counts)))
            for j in range(n):
                counts[j] += 1

    def add(self, other: SpecCounters) -> None:
        """Another's counts added to these, position by position (a window's sum over its requests)."""
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted
        pairs = ((self.drafted_per_pos, other.drafted_per_pos), (self.accepted_per_pos, other.accepted_per_pos))
        for counts, more in pairs:
            if len(counts) < len(more):
                counts.extend([0] * (len(more) - len(counts)))
            for j, n in enumerate(more):
                counts[j] += n

    def copy(self) -> SpecCounters:
        per_pos = {"accepted_per_pos": list(self.accepted_per_pos), "drafted_per_pos": list(self.drafted_per_pos)}
        return SpecCounters(self.steps, self.drafted, self.accepted, self.emitted, **per_pos)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0

    def acceptance_by_position(self) -> list[float]:
        """Every drafted position's, those never accepted included (at 0)."""
        accepted = self.accepted_per_pos + [0] * (len(self.drafted_per_pos) - len(self.accepted_per_pos))
        return [a / d if d else 0.0 for a, d in zip(accepted, self.drafted_per_pos)]

    def as_dict(self) -> dict:
        return {
            "drafted": self.drafted,
            "accepted": self.accepted,
            "verify_steps": self.steps,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_tokens_per_step": round(self.mean_tokens_per_step, 4),
            "acceptance_by_position": [round(x, 4) for x in self.acceptance_by_position()],
        }


@dataclass
class RequestMetrics:
    arrival: float = field(default_factory=time.perf_counter)
    scheduled: float | None = None  # first admitted by the scheduler
    first_token: float | None = None
    finished: float | None = None
    last_token: float | None = None
    inter_token: list[float] = field(default_factory=list)  # seconds between consecutive emitted tokens
    spec: SpecCounters = field(default_factory=SpecCounters)

    def on_tokens(self, n: int, now: float) -> None:
        if n <= 0:
            return
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None:
            # n tokens arrived together: spread the gap evenly, as a client reading the stream sees it.
            self.inter_token.extend([(now - self.last_token) / n] * n)
        self.last_token = now

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled is None else self.scheduled - self.arrival

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def mean_itl(self) -> float | None:
        return sum(self.inter_token) / len(self.inter_token) if self.inter_token else None
