"""The proposer interface: guess up to k next tokens for every decoding sequence in one call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch

from sampling.params import SamplingParams


@dataclass
class DraftRequest:
    seq_id: int
    token_ids: list[int]  # prompt + accepted output; the last token has no KV in the target yet
    k: int  # at most this many draft tokens
    params: SamplingParams
    # [n, d]: the target's final hidden states whose logits predicted token_ids[-n:] (see Proposer.hidden_rows)
    hidden: torch.Tensor | None = None


@dataclass
class Draft:
    tokens: list[int]
    # [len(tokens), vocab] probabilities the tokens were drawn from; None = point mass (deterministic guess).
    probs: torch.Tensor | None = None


class Proposer(ABC):
    # Which of the target's final hidden states a request carries: none, the last row, or every row since the
    # previous proposal for that sequence (prompt included).
    hidden_rows: Literal["none", "last", "all"] = "none"

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """One draft (possibly empty) per request, in order."""

    def release(self, seq_id: int) -> None:  # noqa: B027 - optional hook
        """Forget a finished or preempted sequence."""
