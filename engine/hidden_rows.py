"""Which of the target's hidden rows a learned drafter gets, kept per sequence between steps (functional core
of the engine's side of `Proposer.hidden_rows`, see speculator/proposer.py).

Each step the runner returns the hidden rows the engine asked for, in feed order; after verification only the
rows of tokens now in the sequence are kept (the chunk or pending token, then the accepted drafts: row f of a
feed that starts at position `start` predicted token start + f + 1). They wait until the sequence's next
proposal, which takes them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.runner import StepInput


@dataclass
class PendingHidden:
    """Rows not handed to the proposer yet, in order: together [n, d], they predicted token_ids[end - n : end]."""

    rows: list[torch.Tensor]
    end: int


def rows_wanted(mode: str, num_fed: int, num_logits: int) -> int:
    """Hidden rows to ask the runner for, for an item of `num_fed` tokens with `num_logits` logits rows."""
    return num_fed if mode == "all" else num_logits if mode == "last" else 0


def keep(
    pending: PendingHidden | None, mode: str, item: StepInput, rows: torch.Tensor, num_valid: int
) -> PendingHidden | None:
    """`pending` after a step whose item got `rows` (its last `item.num_hidden` feed rows) and whose first
    `num_valid` fed tokens are now in the sequence. "last" keeps the newest row only; "all" appends, or starts
    over where the new rows do not continue the pending ones (a recompute after a preemption)."""
    first = len(item.token_ids) - item.num_hidden  # feed index of rows[0]
    rows = rows[: max(0, num_valid - first)]
    if not rows.shape[0]:
        return pending
    begin = item.start + first + 1  # the token rows[0] predicted
    end = begin + rows.shape[0]
    if mode == "last":
        return PendingHidden([rows[-1:]], end)
    if pending is None or pending.end != begin:
        return PendingHidden([rows], end)
    pending.rows.append(rows)
    pending.end = end
    return pending


def along_path(
    item: StepInput, path_tokens: list[int], rows: torch.Tensor, path: list[int]
) -> tuple[StepInput, torch.Tensor]:
    """A verified token tree's item and rows (one per node, node-ordered) seen as the chain of its accepted
    `path` (node indices, root first; `path_tokens` their tokens): node path[d] predicted token start + d + 1."""
    chain = StepInput(path_tokens, item.start, item.block_table, len(path), len(path))
    return chain, rows[torch.as_tensor(path, device=rows.device)]


def take(pending: PendingHidden | None, num_tokens: int) -> torch.Tensor | None:
    """The pending rows [n, d] for a sequence of `num_tokens` tokens; None unless they end at its last token."""
    if pending is None or pending.end != num_tokens:
        return None
    return pending.rows[0] if len(pending.rows) == 1 else torch.cat(pending.rows)
