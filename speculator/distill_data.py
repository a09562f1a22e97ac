"""The target's hidden states along sequences it produced, for distillation: one teacher-forced pass.

Generating records the tokens; running prompt + output back through the target as a batched prefill gives the
final hidden state and the target's greedy choice at every position in one forward per batch, the same states
decoding saw (up to float rounding of a different kernel path), much faster than collecting them step by step.
"""

from __future__ import annotations

from collections.abc import Iterator

from model.runner import ModelRunner, StepInput
from speculator.distill import DistillRecord


def _batches(lengths: list[int], block_size: int, max_tokens: int, max_blocks: int) -> Iterator[list[int]]:
    """Indices of sequences packed into batches of at most `max_tokens` tokens (a longer one alone) and
    `max_blocks` KV blocks."""
    batch, tokens, blocks = [], 0, 0
    for i, n in enumerate(lengths):
        need = -(-n // block_size)
        if need > max_blocks:
            raise ValueError(f"a sequence of {n} tokens does not fit the KV pages ({max_blocks} blocks)")
        if batch and (tokens + n > max_tokens or blocks + need > max_blocks):
            yield batch
            batch, tokens, blocks = [], 0, 0
        batch.append(i)
        tokens, blocks = tokens + n, blocks + need
    if batch:
        yield batch


def teacher_forced_records(
    runner: ModelRunner,
    sequences: list[tuple[list[int], int]],
    max_batch_tokens: int = 2048,
    progress=None,
) -> list[DistillRecord]:
    """For each (token_ids, first) the hidden states at positions first-1 .. len-1 (from the last prompt token
    on when `first` is where the output starts) and the target's argmax after each of them. Writes KV pages 1..
    freely: the caller must own the runner's pages (no request in flight, and its block manager reset
    afterwards). `progress(n)` is told of each batch."""
    bs = runner.block_size
    out: list[DistillRecord] = []
    for batch in _batches([len(t) for t, _ in sequences], bs, max_batch_tokens, runner.num_blocks - 1):
        items, next_block = [], 1
        for i in batch:
            tokens, first = sequences[i]
            need = -(-len(tokens) // bs)
            table = list(range(next_block, next_block + need))
            next_block += need
            rows = len(tokens) - first + 1
            items.append(StepInput(tokens, 0, table, rows, num_hidden=rows))
        step = runner.execute_with_hidden(items)
        hidden = step.hidden.float().cpu().clone()  # a plain tensor (not an inference one) that training can use
        greedy = step.logits.argmax(-1).cpu()
        row = 0
        for i, item in zip(batch, items):
            tokens, first = sequences[i]
            rows = slice(row, row + item.num_hidden)
            out.append(DistillRecord(tokens, hidden[rows], first - 1, greedy_next=greedy[rows]))
            row += item.num_hidden
        if progress is not None:
            progress(len(batch))
    return out
