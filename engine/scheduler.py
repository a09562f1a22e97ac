"""Iteration-level continuous batching over a paged KV pages.

Every step, in arrival order: running sequences first (a decode step of 1 + k speculative slots, or the next
chunk of an unfinished prefill), then waiting ones while the token budget and the sequence cap allow. The
wish list goes to the block manager through `kv_cache/block_tables.py` (one call at most, none for a decode
step inside held blocks), which keeps the block tables; when the pool runs dry the manager drops speculation
first, then preempts the newest running sequences, which are recomputed later (usually a prefix-cache hit).
Plain Python: no torch, no Ray.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.sequence import SeqStatus, Sequence
from kv_cache.block_batch import Admit, BlockService, Extend
from kv_cache.block_tables import BlockTables
from model.attention.tree import MAX_TREE_NODES


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # uncomputed tokens fed this step (a prefill chunk, or the one pending token)
    num_lookahead: int  # slots reserved for speculative tokens (a token tree's nodes after its root)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write pairs to apply first
    max_depth: int = -1  # the most draft tokens one candidate may have; -1: num_lookahead (one chain)

    @property
    def depth(self) -> int:
        return self.num_lookahead if self.max_depth < 0 else min(self.max_depth, self.num_lookahead)

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
        blocks: BlockService,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        num_candidates: int = 1,
    ):
        """`num_candidates` > 1: a decoding sequence with k speculative tokens gets k * num_candidates lookahead
        slots (within the token budget and the context), room for a token tree of that many candidates."""
        self.num_candidates = num_candidates
        self.blocks = BlockTables(blocks, num_blocks, block_size)
        self.tables = self.blocks.tables  # seq_id -> block table, read by the forward
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Prompt tokens of admissions (recomputes included), and those whose KV the prefix cache already held.
        self.num_prefix_queried_tokens = 0
        self.num_prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_free_blocks(self) -> int:
        """As of the block manager's last answer."""
        return self.blocks.num_free_blocks

    def commit(self, seq: Sequence) -> None:
        """The sequence's KV is valid up to num_computed (rejected speculative slots are simply not counted)."""
        self.blocks.commit(seq.seq_id, seq.token_ids, seq.num_computed)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run `child` from `parent`'s prompt KV (shared blocks, copy-on-write): it has the parent's computed
        tokens and runs right after it."""
        child.status, child.num_computed = SeqStatus.RUNNING, parent.num_computed
        child.first_scheduled = parent.first_scheduled
        self.blocks.fork(parent.seq_id, child.seq_id, parent.num_computed)
        self.running.insert(self.running.index(parent) + 1, child)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or cancelled sequence and return its blocks (see `BlockTables.free`)."""
        seq.status = SeqStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)

    def reset(self) -> None:
        """Every KV page is lost: all running sequences restart from scratch, the block manager starts empty."""
        for seq in list(self.running):
            self._preempt(seq)
        self.blocks.reset()

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

    def verified_rows(self, seq: Sequence) -> int:
        """Rows a decoding sequence's next step verifies at its current k: its pending token and the lookahead
        slots it would be given with budget to spare (what the cost model prices the rest of a batch at)."""
        return 1 + self._tree_slots(seq, self._lookahead(seq, self.max_model_len), self.max_model_len)

    def _tree_slots(self, seq: Sequence, k: int, budget: int) -> int:
        """Lookahead slots for a tree of `num_candidates` paths of up to k tokens (a tree has at most
        MAX_TREE_NODES nodes, its root included)."""
        if self.num_candidates == 1:
            return k
        return max(0, min(k * self.num_candidates, budget, self.max_model_len - len(seq.token_ids), MAX_TREE_NODES - 1))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.status, seq.num_computed = SeqStatus.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Keep FCFS: an older preempted sequence goes back ahead of newer arrivals.
        index = next((i for i, w in enumerate(self.waiting) if w.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(index, seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        extend, admit = [], []
        planned: dict[int, tuple[Sequence, int]] = {}
        for seq in self.running:
            if budget <= 0:
                break
            num_tokens = min(seq.num_uncomputed, budget)
            k = self._lookahead(seq, budget - num_tokens) if seq.is_decoding else 0
            slots = self._tree_slots(seq, k, budget - num_tokens)
            end = seq.num_computed + num_tokens
            extend.append(Extend(seq.seq_id, seq.num_computed, end + slots, end))
            planned[seq.seq_id] = (seq, num_tokens, k)
            budget -= num_tokens + slots
        admitting, seats = [], sum(1 + s.num_pending_forks for s in self.running)
        for seq in self.waiting:
            # a sequence with n > 1 is admitted with its siblings' seats (and a block each, see Admit.reserve)
            if budget <= 0 or seats + 1 + seq.num_pending_forks > self.max_num_seqs:
                break
            num_tokens = min(len(seq.token_ids), budget)
            admit.append(
                Admit(
                    seq.seq_id,
                    list(seq.token_ids),
                    num_tokens,
                    use_prefix_cache=not seq.wants_prompt_logits,
                    reserve=seq.num_pending_forks,
                )
            )
            admitting.append(seq)
            seats += 1 + seq.num_pending_forks
            budget -= num_tokens
        result = self.blocks.step(extend, admit)

        preempted = [planned[seq_id][0] for seq_id in result.preempted]
        for seq in preempted:
            self._preempt(seq)
        admitted = {seq.seq_id: seq for seq in admitting}
        scheduled = []
        for g in result.granted:
            if g.seq_id in admitted:
                seq = admitted[g.seq_id]
                self.waiting.remove(seq)
                seq.status, seq.num_computed = SeqStatus.RUNNING, g.num_cached
                seq.first_scheduled = seq.first_scheduled or time.perf_counter()
                self.num_prefix_queried_tokens += len(seq.token_ids)
                self.num_prefix_hit_tokens += g.num_cached
                self.running.append(seq)
                scheduled.append(ScheduledSeq(seq, g.num_slots - g.num_cached, 0, g.copies))
            else:
                seq, num_tokens, k = planned[g.seq_id]
                lookahead = g.num_slots - seq.num_computed - num_tokens
                scheduled.append(ScheduledSeq(seq, num_tokens, lookahead, g.copies, k))
        return SchedulerOutput(scheduled, preempted)

    def num_allocated_slots(self) -> int:
        """Token slots held by live tables (shared blocks counted per sequence); for KV-waste stats."""
        return self.blocks.num_allocated_slots()
