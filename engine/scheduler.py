"""Iteration-level continuous batching over a paged KV pool.

Every step, in arrival order: running sequences first (a decode step of 1 + k speculative slots, or the next
chunk of an unfinished prefill), then waiting ones while the token budget and the sequence cap allow. When
the pool runs dry, speculation is dropped first, then the newest running sequence is preempted: its blocks
are freed and it is recomputed later (usually a prefix-cache hit). Plain Python: no torch, no Ray.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.sequence import SeqStatus, Sequence
from kv_cache.block_manager import BlockManager


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
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or cancelled sequence and free its blocks at once."""
        seq.status = SeqStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.bm.has(seq.seq_id):
            self.bm.free(seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.status, seq.num_computed = SeqStatus.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Keep FCFS: an older preempted sequence goes back ahead of newer arrivals.
        index = next((i for i, w in enumerate(self.waiting) if w.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(index, seq)

    def _lookahead(self, seq: Sequence, num_tokens: int, budget: int) -> int:
        """Speculative slots for a decoding sequence: its k, cut to the context, max_tokens, budget and pool."""
        k = min(
            seq.spec_k,
            self.max_model_len - len(seq.token_ids),
            seq.params.max_tokens - seq.num_output_tokens - 1,
            budget - 1,
        )
        end = seq.num_computed + num_tokens
        while k > 0 and self.bm.num_blocks_needed(seq.seq_id, seq.num_computed, end + k) > self.bm.num_free_blocks:
            k -= 1
        return max(k, 0)

    def _reserve(self, seq: Sequence, num_tokens: int, lookahead: int) -> ScheduledSeq | None:
        copies = self.bm.append_slots(seq.seq_id, seq.num_computed, seq.num_computed + num_tokens + lookahead)
        return None if copies is None else ScheduledSeq(seq, num_tokens, lookahead, copies)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_tokens = min(seq.num_uncomputed, budget)
            lookahead = self._lookahead(seq, num_tokens, budget) if seq.is_decoding else 0
            item = self._reserve(seq, num_tokens, lookahead)
            while item is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
                item = self._reserve(seq, num_tokens, 0)
            if item is None:
                break
            scheduled.append(item)
            budget -= num_tokens + item.num_lookahead
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if not self.bm.has(seq.seq_id):
                seq.num_computed = self.bm.allocate(seq.seq_id, seq.token_ids)
            num_tokens = min(seq.num_uncomputed, budget)
            item = self._reserve(seq, num_tokens, 0)
            if item is None:
                self.bm.free(seq.seq_id)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(item)
            budget -= num_tokens
        return SchedulerOutput(scheduled, preempted)
