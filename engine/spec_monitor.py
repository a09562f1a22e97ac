"""Speculation live, per workload class, drafter and drafter version: cumulative counts, and a sliding window over
the last finished requests of each, so that a drafter which stops paying on some class shows within a few requests
(speculator/drift.py compares the windows with the plan). The engine records on its step thread; `snapshot` may be
called from any other (it copies under the lock, and what it returns is never written again).

A request's stretch under one key enters that key's window when the request finishes, or when the request moves to
another key (its drafter swapped mid-request: the tokens after the swap count for the new version)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from engine.metrics import SpecCounters

DEFAULT_CLASS = "default"  # the class of every request without a classifier
FIRST_VERSION = "0"  # a drafter's version until it is swapped
WINDOW_REQUESTS = 256


@dataclass(frozen=True)
class SpecKey:
    workload_class: str
    drafter: str  # "none": requests that never draft
    version: str


@dataclass(frozen=True)
class SpecStats:
    """One key's figures at a snapshot: `total` since the engine started, `window` summed over the stretches of
    the last `window_requests` requests (both copies)."""

    key: SpecKey
    total: SpecCounters
    requests: int  # requests (stretches) finished under this key, ever
    window: SpecCounters
    window_requests: int
    order: int  # when the key was first seen (a later version of a drafter has a higher one)
    last_finish: int  # monitor-wide order of the latest request that finished under it (0: none yet)

    @property
    def window_acceptance_rate(self) -> float:
        return self.window.acceptance_rate

    @property
    def window_tokens_per_step(self) -> float:
        return self.window.mean_tokens_per_step

    def window_acceptance_by_position(self) -> list[float]:
        return self.window.acceptance_by_position()


class _Series:
    __slots__ = ("key", "order", "total", "requests", "window", "last_finish")

    def __init__(self, key: SpecKey, order: int, window_requests: int):
        self.key, self.order = key, order
        self.total = SpecCounters()
        self.requests = 0
        self.window: deque[SpecCounters] = deque(maxlen=window_requests)
        self.last_finish = 0


class SpecTrack:
    """A request's stretch under one key: the key's series and the stretch's own counts."""

    __slots__ = ("series", "counts")

    def __init__(self, series: _Series):
        self.series = series
        self.counts = SpecCounters()

    @property
    def key(self) -> SpecKey:
        return self.series.key


class SpecMonitor:
    def __init__(self, window_requests: int = WINDOW_REQUESTS):
        if window_requests < 1:
            raise ValueError("window_requests must be at least 1")
        self.window_requests = window_requests
        self._series: dict[SpecKey, _Series] = {}
        self._finished = 0
        self._lock = threading.Lock()

    def track(self, key: SpecKey) -> SpecTrack:
        """A new request's stretch under `key`."""
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(key, len(self._series) + 1, self.window_requests)
        return SpecTrack(series)

    def record(self, track: SpecTrack, drafted: int, accepted: int, emitted: int) -> None:
        """One verification step of the request (per step: nothing allocated beyond SpecCounters.record's)."""
        track.counts.record(drafted, accepted, emitted)
        with self._lock:
            track.series.total.record(drafted, accepted, emitted)

    def finish(self, track: SpecTrack) -> None:
        """The request's stretch enters its key's window."""
        with self._lock:
            self._finished += 1
            series = track.series
            series.window.append(track.counts)
            series.requests += 1
            series.last_finish = self._finished

    def move(self, track: SpecTrack, key: SpecKey) -> SpecTrack:
        """The request goes on under `key` (its drafter's new version): the stretch so far ends where it drafted,
        unless it has no step there yet."""
        if track.counts.steps:
            self.finish(track)
        return self.track(key)

    def snapshot(self) -> dict[SpecKey, SpecStats]:
        with self._lock:
            copied = [(s, s.total.copy(), s.requests, tuple(s.window), s.last_finish) for s in self._series.values()]
        out = {}
        for series, total, requests, window, last_finish in copied:
            summed = SpecCounters()
            for counts in window:  # never written again once in a window
                summed.add(counts)
            out[series.key] = SpecStats(series.key, total, requests, summed, len(window), series.order, last_finish)
        return out
