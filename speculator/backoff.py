"""Per-sequence speculation length: grow k while drafts are accepted, shrink it when they are not.

After a step with a accepted of k drafted, the next k is a + 1 (all accepted: k + 1, capped at k_max). After
`patience` consecutive steps with nothing accepted, speculation pauses for `cooldown` steps and then restarts
at k = 1, so a sequence where guessing does not pay costs almost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KController:
    k_max: int
    patience: int = 2
    cooldown: int = 8
    k: int = -1
    misses: int = 0
    paused: int = 0

    def __post_init__(self) -> None:
        if self.k < 0:
            self.k = self.k_max

    def next_k(self) -> int:
        if self.paused:
            self.paused -= 1
            if self.paused == 0:
                self.k = min(1, self.k_max)
            return 0
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == 0:
            self.misses += 1
            if self.misses >= self.patience:
                self.misses, self.paused = 0, self.cooldown
            self.k = max(1, self.k // 2)
            return
        self.misses = 0
        self.k = min(self.k_max, accepted + 1)
