"""Iteration-level continuous batching over a paged KV pages.

Every step, in arrival order: running sequences first (a decode step of 1 + k speculative slots, or the next
chunk of an unfinished prefill), then waiting ones while the token budget and the sequence cap allow. The
wish list goes to the block manager in ONE batch call (`kv_cache/block_batch.py`); when the pool runs dry it
drops speculation first, then preempts the newest running sequences, which are recomputed later (usually a
prefix-cache hit). The scheduler mirrors the block tables it is told about. Plain Python: no torch, no Ray.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from engine.sequence import SeqStatus, Sequence
from kv_cache.block_batch import Admit, BlockPool, BlockStep, BlockStepResult, Commit, Extend, Grant


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # uncomputed tokens fed this step (a prefill chunk, or the one pending token)
    num_lookahead: int  # slots reserved for speculative tokens
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write pairs to apply first

    @property
    def completes_prefill(self) -> bool:
        """After this step the sequence's next token can be sampled."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]


class Scheduler:
    def __init__(
        self,
        blocks: BlockPool,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ):
        self.blocks = blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.tables: dict[int, list[int]] = {}  # mirror of the manager's block tables
        self.num_free_blocks = num_blocks - 1  # as of the manager's last answer
        self.num_preemptions = 0
        # Prompt tokens of admissions (recomputes included), and those whose KV the prefix cache already held.
        self.num_prefix_queried_tokens = 0
        self.num_prefix_hit_tokens = 0
        self._known: dict[int, int] = {}  # tokens the manager holds per sequence
        self._free: list[int] = []
        self._commits: dict[int, Commit] = {}
        self._step_ids = itertools.count()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- messages for the next block step ---------------------------------------------------------------

    def commit(self, seq: Sequence) -> None:
        """The sequence's KV is valid up to num_computed (rejected speculative slots are simply not counted)."""
        known = self._known[seq.seq_id]
        c = self._commits.get(seq.seq_id)
        if c is None:
            c = self._commits[seq.seq_id] = Commit(seq.seq_id, [], 0)
        c.new_tokens.extend(seq.token_ids[known:])
        c.num_computed = seq.num_computed
        self._known[seq.seq_id] = len(seq.token_ids)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or cancelled sequence; its blocks go back with the next block step (or flush)."""
        seq.status = SeqStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self._forget(seq.seq_id):
            self._free.append(seq.seq_id)

    def _forget(self, seq_id: int) -> bool:
        """Drop the mirror of a sequence's blocks; True if it had any."""
        self._known.pop(seq_id, None)
        self._commits.pop(seq_id, None)
        return self.tables.pop(seq_id, None) is not None

    def flush(self) -> None:
        """Send pending frees and commits now (the engine goes idle, or a cancellation must free at once)."""
        if self._free or self._commits:
            self._send(BlockStep(next(self._step_ids)))

    def _send(self, step: BlockStep) -> BlockStepResult:
        step.free, step.commit = self._free, list(self._commits.values())
        if (
            step.free
            or step.admit
            or any(e.num_slots > len(self.tables[e.seq_id]) * self.block_size for e in step.extend)
        ):
            result = self.blocks.step(step)  # may raise: then nothing here has changed and it can be retried
        else:  # the answer is known: every wish fits the blocks held, and no block changes hands
            self.blocks.post(step)
            grants = [Grant(e.seq_id, e.num_slots, 0, len(self.tables[e.seq_id]), [], []) for e in step.extend]
            result = BlockStepResult(step.step_id, grants, [], self.num_free_blocks)
        self._free, self._commits = [], {}
        self.num_free_blocks = result.num_free_blocks
        return result

    def reset(self) -> None:
        """The manager lost every block (it was rebuilt): all running sequences restart from scratch."""
        for seq in list(self.running):
            self._preempt(seq)
        self.tables.clear()
        self._known.clear()
        self._free, self._commits = [], {}

    # ---- the step ----------------------------------------------------------------------------------------

    def _lookahead(self, seq: Sequence, budget: int) -> int:
        """Speculative slots wanted by a decoding sequence: its k, cut to the context, max_tokens and the
        budget left after its pending token."""
        k = min(
            seq.spec_k,
            self.max_model_len - len(seq.token_ids),
            seq.params.max_tokens - seq.num_output_tokens - 1,
            budget,
        )
        return max(k, 0)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._forget(seq.seq_id)  # the manager has freed its blocks already
        seq.status, seq.num_computed = SeqStatus.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Keep FCFS: an older preempted sequence goes back ahead of newer arrivals.
        index = next((i for i, w in enumerate(self.waiting) if w.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(index, seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        step = BlockStep(next(self._step_ids))
        planned: dict[int, tuple[Sequence, int]] = {}
        for seq in self.running:
            if budget <= 0:
                break
            num_tokens = min(seq.num_uncomputed, budget)
            k = self._lookahead(seq, budget - num_tokens) if seq.is_decoding else 0
            end = seq.num_computed + num_tokens
            step.extend.append(Extend(seq.seq_id, seq.num_computed, end + k, end))
            planned[seq.seq_id] = (seq, num_tokens)
            budget -= num_tokens + k
        admitting = []
        for seq in self.waiting:
            if budget <= 0 or len(self.running) + len(admitting) >= self.max_num_seqs:
                break
            num_tokens = min(len(seq.token_ids), budget)
            step.admit.append(Admit(seq.seq_id, list(seq.token_ids), num_tokens))
            admitting.append(seq)
            budget -= num_tokens
        result = self._send(step)

        preempted = [planned[seq_id][0] for seq_id in result.preempted]
        for seq in preempted:
            self._preempt(seq)
        admitted = {seq.seq_id: seq for seq in admitting}
        scheduled = []
        for g in result.granted:
            table = self.tables.setdefault(g.seq_id, [])
            del table[g.table_from :]
            table.extend(g.blocks)
            if g.seq_id in admitted:
                seq = admitted[g.seq_id]
                self.waiting.remove(seq)
                seq.status, seq.num_computed = SeqStatus.RUNNING, g.num_cached
                seq.first_scheduled = seq.first_scheduled or time.perf_counter()
                self.num_prefix_queried_tokens += len(seq.token_ids)
                self.num_prefix_hit_tokens += g.num_cached
                self.running.append(seq)
                self._known[seq.seq_id] = len(seq.token_ids)
                scheduled.append(ScheduledSeq(seq, g.num_slots - g.num_cached, 0, g.copies))
            else:
                seq, num_tokens = planned[g.seq_id]
                lookahead = g.num_slots - seq.num_computed - num_tokens
                scheduled.append(ScheduledSeq(seq, num_tokens, lookahead, g.copies))
        return SchedulerOutput(scheduled, preempted)

    def num_allocated_slots(self) -> int:
        """Token slots held by live tables (shared blocks counted per sequence); for KV-waste stats."""
        return sum(len(t) for t in self.tables.values()) * self.block_size
