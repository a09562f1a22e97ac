"""What a drafter learns to propose after each position of a target record: the target's own greedy choices.

A record's tokens are what the target emitted; when they were sampled (at a temperature, to vary the training
data) a token is often not the one greedy verification accepts. The target's argmax at every position of the
record (`greedy_next`, from the same teacher-forced pass as the hidden states) is: the label of chained stage i
after position t is the target's argmax after t+1+i, kept only where the record's tokens t+2 .. t+1+i (stage
1..i's inputs) were the target's argmax too, i.e. where a greedy chain could have reached it. On a greedy record
the labels are its own tokens.
"""

from __future__ import annotations

import torch


def chain_labels(
    token_ids: list[int], hidden_start: int, rows: int, steps: int, greedy_next: torch.Tensor | None = None
) -> torch.Tensor:
    """Labels [rows, steps] for positions hidden_start .. hidden_start + rows - 1: at row j (position t) stage i's
    label, token t+2+i, or -1 where it does not exist. `greedy_next[k]` is the target's argmax after position
    hidden_start + k; given, the labels are those argmaxes, -1 where a stage's inputs left the greedy path."""
    ids = torch.tensor(token_ids + [-1] * (steps + 2), dtype=torch.long)
    pos = torch.arange(rows)[:, None] + hidden_start + 2 + torch.arange(steps)  # position of each label
    tokens = ids[pos]
    if greedy_next is None:
        return tokens
    g = torch.cat([greedy_next.long(), torch.full((steps + 1,), -1, dtype=torch.long)])
    greedy = g[pos - 1 - hidden_start]  # argmax after position t+1+i predicts token t+2+i
    # stage i reads tokens t+2 .. t+1+i; each must be the argmax the stage before it was taught
    on_path = torch.ones_like(greedy, dtype=torch.bool)
    on_path[:, 1:] = (tokens[:, :-1] == greedy[:, :-1]).cumprod(dim=1).bool()
    return torch.where(on_path, greedy, -1)
