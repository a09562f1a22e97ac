"""A drafter scored offline on sequences the target produced: replay greedy verification along each recorded
sequence, as the engine would run it, and count the tokens each step emits. One yardstick for every drafter
(n-gram lookup, suffix trie, MLP speculator), so a freshly distilled drafter and the live one are compared on the
same held-out traffic before anything is deployed.

A step at prefix length L asks the drafter for k tokens (with the target's hidden row that predicted token L-1,
or every row since its last proposal for a drafter that reads them all), accepts the longest prefix that equals
the recorded tokens L.., and emits it plus one more (the target's own token), so L advances by accepted + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sampling.params import SamplingParams
from speculator.distill import DistillRecord
from speculator.proposer import DraftRequest, Proposer

_GREEDY = SamplingParams(temperature=0.0)


@dataclass
class ReplayScore:
    steps: int = 0
    emitted: int = 0
    accepted_by_position: list[int] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.steps if self.steps else 1.0

    def acceptance_by_position(self) -> list[float]:
        """Share of steps whose draft position j was accepted (survival)."""
        return [a / self.steps for a in self.accepted_by_position] if self.steps else []


def _hidden(record: DistillRecord, start: int, end: int) -> torch.Tensor | None:
    """Rows of positions start .. end - 1 (clipped to what the record holds)."""
    lo, hi = max(start - record.hidden_start, 0), end - record.hidden_start
    if hi <= lo or hi > record.hidden.shape[0]:
        return None
    return record.hidden[lo:hi]


def replay(proposer: Proposer, records: list[DistillRecord], k: int) -> ReplayScore:
    """Greedy verification of `proposer`'s drafts along every record's output (see the module docstring). Each
    record is its own sequence to the proposer, released at its end."""
    score = ReplayScore(accepted_by_position=[0] * k)
    for seq_id, record in enumerate(records):
        tokens = record.token_ids
        first = record.output_start if record.output_start is not None else record.hidden_start + 1
        length, delivered = first + 1, record.hidden_start
        try:
            while length < len(tokens):
                if proposer.hidden_rows == "none":
                    hidden = None
                elif proposer.hidden_rows == "last":
                    hidden = _hidden(record, length - 2, length - 1)
                else:
                    hidden = _hidden(record, delivered, length - 1)
                    delivered = length - 1
                draft = proposer.propose([DraftRequest(seq_id, tokens[:length], k, _GREEDY, hidden)])[0].tokens
                accepted = 0
                for j, token in enumerate(draft[:k]):
                    if length + j >= len(tokens) or tokens[length + j] != token:
                        break
                    accepted += 1
                    score.accepted_by_position[j] += 1
                score.steps += 1
                score.emitted += min(accepted + 1, len(tokens) - length)
                length += accepted + 1
        finally:
            proposer.release(seq_id)
    return score
