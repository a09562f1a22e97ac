"""A learned drafter's own vocabulary: the K most frequent target tokens of its training data.

For a small target the drafter's head over the full vocabulary costs a large share of a target step; a head over
K rows costs K/V of that. Draft id d < K stands for target id `ids[d]`; draft id K is a reserved row, "any other
token": on the input side every target token outside the K maps to it (so the drafter still reads any token the
target produced), and on the output side it is a class the drafter may predict but is never proposed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DRAFT_VOCAB_FILE = "draft_vocab.json"


@dataclass(frozen=True)
class DraftVocab:
    ids: tuple[int, ...]  # draft id -> target id, most frequent first
    target_vocab_size: int

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError("a draft vocabulary needs at least one token")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("draft vocabulary ids repeat")
        if min(self.ids) < 0 or max(self.ids) >= self.target_vocab_size:
            raise ValueError(f"draft vocabulary ids must lie in [0, {self.target_vocab_size})")

    @property
    def other(self) -> int:
        """The reserved draft id of every target token outside the vocabulary."""
        return len(self.ids)

    @property
    def num_rows(self) -> int:
        """Rows of the drafter's embeddings and heads: the K tokens plus the reserved row."""
        return len(self.ids) + 1

    @classmethod
    def most_frequent(cls, token_ids: Sequence[int] | torch.Tensor, k: int, target_vocab_size: int) -> DraftVocab:
        """The `k` most frequent of `token_ids` (ties to the lower id); fewer if fewer distinct tokens occur."""
        if k < 1:
            raise ValueError(f"draft vocabulary size must be >= 1, got {k}")
        counts = torch.bincount(torch.as_tensor(token_ids, dtype=torch.long), minlength=target_vocab_size)
        # stable sort on -count keeps lower ids first among equal counts
        order = torch.sort(-counts, stable=True).indices[: min(k, int((counts > 0).sum()))]
        return cls(tuple(order.tolist()), target_vocab_size)

    def to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids of target ids; those outside the vocabulary map to `other`."""
        return self.draft_index(target_ids.device)[target_ids]

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target ids of draft ids < K (the reserved id has none: callers never propose it)."""
        return self.target_index(draft_ids.device)[draft_ids]

    def draft_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[target_vocab_size] long: target id -> draft id."""
        index = torch.full((self.target_vocab_size,), self.other, dtype=torch.long)
        index[torch.tensor(self.ids, dtype=torch.long)] = torch.arange(len(self.ids))
        return index.to(device)

    def target_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[K] long: draft id -> target id."""
        return torch.tensor(self.ids, dtype=torch.long, device=device)

    def save(self, folder: str | Path) -> None:
        data = {"target_vocab_size": self.target_vocab_size, "ids": list(self.ids)}
        (Path(folder) / DRAFT_VOCAB_FILE).write_text(json.dumps(data))

    @classmethod
    def load(cls, folder: str | Path) -> DraftVocab | None:
        """The folder's draft vocabulary, or None when the drafter predicts over the target's full vocabulary."""
        path = Path(folder) / DRAFT_VOCAB_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or set(data) != {"target_vocab_size", "ids"}:
            raise ValueError(f"{path}: expected an object with 'target_vocab_size' and 'ids'")
        return cls(tuple(int(i) for i in data["ids"]), int(data["target_vocab_size"]))
