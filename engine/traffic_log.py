"""The sequences a replica served, kept for retraining its drafters (adaptation): bounded, taken in batches."""

from __future__ import annotations

import threading
from collections import deque

from speculator.adaptation import TrafficRecord


class TrafficLog:
    """The newest `max_records` finished sequences (older ones are dropped); safe to take from another thread."""

    def __init__(self, max_records: int):
        self._records: deque[TrafficRecord] = deque(maxlen=max_records)
        self._lock = threading.Lock()
        self.dropped = 0

    def add(self, record: TrafficRecord) -> None:
        with self._lock:
            if len(self._records) == self._records.maxlen:
                self.dropped += 1
            self._records.append(record)

    def take(self) -> list[TrafficRecord]:
        with self._lock:
            out = list(self._records)
            self._records.clear()
        return out
