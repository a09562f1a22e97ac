"""The block manager's batch protocol, the manager's side: one message per scheduler step, whatever the batch.

The scheduler's side (`block_tables.py`) sends a `BlockStep` only when blocks change hands; the manager
applies it in a fixed order (fork -> commit -> free -> extend -> admit), each sequence all or nothing, and answers
with one `BlockStepResult`: the slots granted, the table changes (only the tail that moved), the copy-on-write
pairs and the sequences it had to preempt. Commits go first so that a finished sequence's full blocks are
hashed before they are freed (a later prompt that repeats them is a prefix hit). Plain Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from kv_cache.block_manager import BlockManager, CopyPairs


@dataclass
class Extend:
    """A running sequence wants slots [0, num_slots); at least [0, min_slots) or it is preempted."""

    seq_id: int
    num_computed: int
    num_slots: int
    min_slots: int


@dataclass
class Admit:
    """A waiting sequence: reuse its longest cached prefix (unless `use_prefix_cache` is false: it computes
    every position), then feed up to `num_tokens` more tokens. Admitted only if `reserve` free blocks are left
    after it (the children it will fork write their own last blocks)."""

    seq_id: int
    token_ids: list[int]
    num_tokens: int
    use_prefix_cache: bool = True
    reserve: int = 0


@dataclass
class Fork:
    """`child` shares `parent`'s blocks (copy-on-write), which hold the KV of the parent's first `num_tokens`."""

    parent: int
    child: int
    num_tokens: int


@dataclass
class Commit:
    """KV is valid for the first `num_computed` tokens; `new_tokens` were appended since the last message."""

    seq_id: int
    new_tokens: list[int]
    num_computed: int


@dataclass
class BlockStep:
    fork: list[Fork] = field(default_factory=list)  # first: the parents' tokens are the shared prefix still
    commit: list[Commit] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    extend: list[Extend] = field(default_factory=list)  # in priority order: the last ones are preempted first
    admit: list[Admit] = field(default_factory=list)  # in arrival order: stops at the first that does not fit


@dataclass
class Grant:
    seq_id: int
    num_slots: int  # slots [0, num_slots) are backed by blocks
    num_cached: int  # admitted sequences: prompt tokens whose KV came from the prefix cache
    table_from: int  # the table from this index on is now `blocks`
    blocks: list[int]
    copies: CopyPairs


@dataclass
class BlockStepResult:
    granted: list[Grant]  # extends first (in order), then admits
    preempted: list[int]
    num_free_blocks: int


class BlockService(Protocol):
    """Where the block manager lives: in this process (`BatchedBlockManager`) or in an actor (its client)."""

    def step(self, request: BlockStep) -> BlockStepResult: ...
    def reset(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...


class BatchedBlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.tokens: dict[int, list[int]] = {}  # what each live sequence's blocks hold, for prefix hashing

    def step(self, request: BlockStep) -> BlockStepResult:
        bm = self.bm
        for f in request.fork:
            bm.fork(f.parent, f.child)
            self.tokens[f.child] = self.tokens[f.parent][: f.num_tokens]
        for c in request.commit:
            tokens = self.tokens[c.seq_id]
            tokens.extend(c.new_tokens)
            bm.commit(c.seq_id, tokens, c.num_computed)
        for seq_id in request.free:
            if bm.has(seq_id):
                bm.free(seq_id)
            self.tokens.pop(seq_id, None)
        granted: list[Grant] = []
        preempted: list[int] = []
        extends = list(request.extend)
        i = 0
        while i < len(extends):
            e = extends[i]
            grant = self._grow(e.seq_id, e.num_computed, e.min_slots, e.num_slots)
            while grant is None:  # preempt from the back until this one fits with no lookahead
                victim = extends.pop()
                bm.free(victim.seq_id)
                self.tokens.pop(victim.seq_id, None)
                preempted.append(victim.seq_id)
                if victim is e:
                    break
                grant = self._grow(e.seq_id, e.num_computed, e.min_slots, e.min_slots)
            if grant is None:
                break
            granted.append(grant)
            i += 1
        for a in request.admit if not preempted else ():
            cached = bm.allocate(a.seq_id, a.token_ids, lookup=a.use_prefix_cache)
            end = min(cached + a.num_tokens, len(a.token_ids))
            grant = self._grow(a.seq_id, cached, end, end, num_cached=cached)
            if grant is None or bm.num_free_blocks < a.reserve:
                bm.free(a.seq_id)
                break
            self.tokens[a.seq_id] = list(a.token_ids)
            granted.append(grant)
        return BlockStepResult(granted, preempted, bm.num_free_blocks)

    def _grow(self, seq_id: int, num_computed: int, min_slots: int, max_slots: int, num_cached: int = 0):
        """The most slots in [min_slots, max_slots] the pool can back, or None if not even min_slots."""
        bm = self.bm
        slots = max_slots
        while slots > min_slots and bm.num_blocks_needed(seq_id, num_computed, slots) > bm.num_free_blocks:
            slots -= 1
        table = bm.block_table(seq_id)
        # copy-on-write and growth happen from `start` on; a newly admitted sequence gets its whole table
        start = 0 if num_cached else min(num_computed // bm.block_size, len(table))
        copies = bm.append_slots(seq_id, num_computed, slots)
        if copies is None:
            return None
        return Grant(seq_id, slots, num_cached, start, table[start:], copies)

    def reset(self) -> None:
        """Forget every sequence and cached prefix (the KV pages were lost or will be recomputed)."""
        bm = self.bm
        self.bm = BlockManager(bm.num_blocks, bm.block_size, bm.enable_prefix_caching)
        self.tokens.clear()

    def stats(self) -> dict[str, Any]:
        bm = self.bm
        return {
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "num_seqs": len(bm.seqs),
            "num_allocated_slots": bm.num_allocated_slots(),
            "prefix_cache_hits": bm.prefix_cache_hits,
            "prefix_cache_queries": bm.prefix_cache_queries,
        }
