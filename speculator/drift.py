"""Drift from the workload plan, seen in live speculation: a class whose drafter now emits fewer tokens per
verification step than the plan expected (its prompts changed, or the drafter did), or a class the plan does not
name. Reads the engine's speculation snapshot (engine/spec_monitor.py; described here by what is read of it, as
this layer sits below the engine) and compares each class's window with the plan's expected tokens per step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from speculator.plan import WorkloadPlan


class _Key(Protocol):
    workload_class: str
    drafter: str
    version: str


class _Stats(Protocol):
    key: _Key
    window_requests: int
    order: int
    last_finish: int

    @property
    def window_tokens_per_step(self) -> float: ...


@dataclass(frozen=True)
class Drift:
    workload_class: str
    reason: Literal["below_plan", "new_class"]
    expected: float | None  # the plan's tokens per step (None: a class it does not name)
    observed: float  # tokens per step over the window of the class's drafter in use
    requests: int  # finished requests behind `observed`


def expected_from_plan(plan: WorkloadPlan) -> dict[str, float]:
    """Tokens per verification step the plan expects of each class's choice."""
    return {c.name: c.expected_tokens_per_step for c in plan.classes}


def current(snapshot: Mapping[object, _Stats]) -> dict[str, _Stats]:
    """Per class, the figures of the drafter in use (the one its latest finished request drafted with) at its
    latest version."""
    by_class: dict[str, list[_Stats]] = {}
    for stats in snapshot.values():
        by_class.setdefault(stats.key.workload_class, []).append(stats)
    out = {}
    for name, all_stats in by_class.items():
        drafter = max(all_stats, key=lambda s: (s.last_finish, s.order)).key.drafter
        out[name] = max((s for s in all_stats if s.key.drafter == drafter), key=lambda s: s.order)
    return out


class DriftDetector:
    def __init__(self, expected: dict[str, float], margin: float, min_requests: int):
        if not 0 <= margin < 1 or min_requests < 1:
            raise ValueError("margin must be in [0, 1) and min_requests at least 1")
        self.expected, self.margin, self.min_requests = dict(expected), margin, min_requests

    def check(self, snapshot: Mapping[object, _Stats]) -> list[Drift]:
        """Classes below plan beyond the margin, and unplanned classes, each over at least `min_requests` finished
        requests of its drafter in use. A class that does not draft (no verification steps) is never below plan."""
        drifts = []
        for name, stats in sorted(current(snapshot).items()):
            requests, observed = stats.window_requests, stats.window_tokens_per_step
            if requests < self.min_requests:
                continue
            expected = self.expected.get(name)
            if expected is None:
                drifts.append(Drift(name, "new_class", None, observed, requests))
            elif observed and observed < expected * (1 - self.margin):
                drifts.append(Drift(name, "below_plan", expected, observed, requests))
        return drifts
