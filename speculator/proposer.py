"""The proposer interface: guess up to k next tokens for every decoding sequence in one call.

A learned drafter reads the target's final hidden states (after the last norm, before the LM head). It says which
rows it needs with `hidden_rows`, and the engine asks the runner for them only then, from the same forward:
- "last": the row whose logits chose the newest token (`hidden` is [1, d]); IBM's MLP speculator.
- "all": every row since the previous proposal for the sequence, prompt included, in order, with no gap: prefill
  chunks and the accepted rows of each verification (an EAGLE-style head that keeps its own KV). After
  `release(seq_id)` (a preemption, a recompute) the rows start over from the first position the target computes
  again; positions served from the prefix cache are never computed, so a sequence may start later than row 0.
A proposer that can give several candidates per sequence overrides `propose_trees`: with the engine's
`num_candidates` > 1 it is called instead of `propose`, and the candidates are verified together as one token
tree (speculator/token_tree.py) in the same single forward. The others keep proposing one chain.
Row i of `hidden` [n, d] is the one whose logits predicted token_ids[len(token_ids) - n + i]; n < len(token_ids) - 1
means the rows of the earlier tokens were delivered before (or never computed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch

from sampling.controls import LogitsControls
from sampling.params import SamplingParams
from speculator.token_tree import TokenTree

HiddenRows = Literal["none", "last", "all"]


@dataclass
class DraftRequest:
    seq_id: int
    token_ids: list[int]  # prompt + accepted output; the last token has no KV in the target yet
    k: int  # at most this many draft tokens
    params: SamplingParams
    # [n, d] the target's final hidden states whose logits predicted token_ids[-n:] (see the module docstring);
    # None for a proposer with hidden_rows "none", or when the engine has no row for it (then: no draft).
    hidden: torch.Tensor | None = None
    controls: LogitsControls | None = None  # a sampling drafter processes its logits by the same rules
    drafter: str | None = None  # speculator auto: the drafter of the request's workload class (routed.py)


@dataclass
class Draft:
    tokens: list[int]
    # [len(tokens), vocab] probabilities the tokens were drawn from; None = point mass (deterministic guess).
    probs: torch.Tensor | None = None


class Proposer(ABC):
    # The target's hidden rows this proposer reads (see the module docstring); "none" costs nothing.
    hidden_rows: HiddenRows = "none"
    # The most draft tokens it can give per step (a learned drafter's number of heads); None = any k. The engine
    # caps its k to it, so no lookahead slot is reserved for a token that cannot come.
    max_k: int | None = None

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """One draft (possibly empty) per request, in order."""

    def release(self, seq_id: int) -> None:  # noqa: B027 - optional hook
        """Forget a finished or preempted sequence."""

    def propose_trees(self, requests: list[DraftRequest], n: int) -> list[TokenTree] | None:  # noqa: ARG002
        """Up to `n` candidate continuations per request, in order, as one tree rooted at its last token (no
        path deeper than its k), for point-mass verification (q = None); None: this proposer gives chains only."""
        return None


def tree_of_paths(request: DraftRequest, paths: list[list[int]]) -> TokenTree:
    """The candidate `paths` of `request` (best first) merged into one tree, each cut to the request's k."""
    return TokenTree.from_paths(request.token_ids[-1], [p[: request.k] for p in paths if request.k > 0])
