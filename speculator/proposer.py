"""The proposer interface: guess up to k next tokens for every decoding sequence in one call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from sampling.controls import LogitsControls
from sampling.params import SamplingParams


@dataclass
class DraftRequest:
    seq_id: int
    token_ids: list[int]  # prompt + accepted output; the last token has no KV in the target yet
    k: int  # at most this many draft tokens
    params: SamplingParams
    controls: LogitsControls | None = None  # a sampling drafter processes its logits by the same rules


@dataclass
class Draft:
    tokens: list[int]
    # [len(tokens), vocab] probabilities the tokens were drawn from; None = point mass (deterministic guess).
    probs: torch.Tensor | None = None


class Proposer(ABC):
    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """One draft (possibly empty) per request, in order."""

    def release(self, seq_id: int) -> None:  # noqa: B027 - optional hook
        """Forget a finished or preempted sequence."""
