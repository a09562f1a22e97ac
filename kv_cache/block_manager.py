"""Paged KV-cache block manager: block tables, ref counts, prefix caching, copy-on-write.

Pure bookkeeping; the worker owns the KV tensors and applies the copy pairs this class returns.
Block 0 is the null block the worker pads block tables with, so it is never handed out.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

CopyPairs = list[tuple[int, int]]  # (src_block, dst_block) copies the worker applies before writing


def hash_block(parent: int | None, tokens: Sequence[int]) -> int:
    """Chained content hash of one full block.

    Built-in tuple hash: fast and deterministic for ints. Swap in a cryptographic hash here if
    collisions (wrong KV reuse) across untrusted tenants matter.
    """
    return hash((parent, tuple(tokens)))


@dataclass
class _SeqState:
    table: list[int] = field(default_factory=list)
    num_hashed: int = 0  # leading table blocks that are full, committed and hashed
    last_hash: int | None = None  # hash of table[num_hashed - 1]; parent of the next block


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # ref == 0 blocks in LRU order: evict from the head, release to the tail.
        self.free_list: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.seqs: dict[Hashable, _SeqState] = {}
        self.prefix_cache_hits = 0  # tokens
        self.prefix_cache_queries = 0  # tokens

    # ---- block primitives ----

    def _uncache(self, b: int) -> None:
        """Forget b's content hash (its KV is about to be overwritten)."""
        h = self.block_hash[b]
        if h is not None:
            if self.hash_to_block.get(h) == b:
                del self.hash_to_block[h]
            self.block_hash[b] = None

    def _pop_free(self) -> int:
        """Take the LRU free block; its cached content is evicted now (lazily), not when it was freed."""
        b, _ = self.free_list.popitem(last=False)
        self._uncache(b)
        self.ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        """Drop one reference; a block that becomes free keeps its hash so it can still be a prefix hit."""
        self.ref[b] -= 1
        assert self.ref[b] >= 0, f"double free of block {b}"
        if self.ref[b] == 0:
            self.free_list[b] = None

    def _plan(self, table: list[int], num_computed: int, num_slots: int) -> tuple[int, range, list[int]]:
        """(new blocks to append, table indices written, indices needing copy-on-write) for a step."""
        needed = -(-num_slots // self.block_size)
        start = num_computed // self.block_size if num_slots > num_computed else needed
        written = range(start, min(len(table), needed))
        cow = [i for i in written if self.ref[table[i]] > 1]
        return max(0, needed - len(table)), written, cow

    # ---- sequence API ----

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], lookup: bool = True) -> int:
        """Start a table from the longest cached prefix; returns cached tokens (multiple of block_size).

        The last token is never covered so the model always computes at least one position (its logits).
        `lookup=False` starts an empty table (its blocks are still hashed for others as they fill).
        """
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} already allocated")
        state = _SeqState()
        if self.enable_prefix_caching and lookup:
            bs = self.block_size
            h: int | None = None
            for i in range((len(token_ids) - 1) // bs):
                h = hash_block(h, token_ids[i * bs : (i + 1) * bs])
                b = self.hash_to_block.get(h)
                if b is None:
                    break
                state.table.append(b)
                state.last_hash = h
            for b in state.table:
                if self.ref[b] == 0:
                    del self.free_list[b]
                self.ref[b] += 1
            state.num_hashed = len(state.table)
            self.prefix_cache_queries += len(token_ids)
            self.prefix_cache_hits += len(state.table) * bs
        self.seqs[seq_id] = state
        return len(state.table) * self.block_size

    def append_slots(self, seq_id: Hashable, num_computed: int, num_slots: int) -> CopyPairs | None:
        """Cover positions [0, num_slots); [num_computed, num_slots) will be written this step.

        Returns (src, dst) block copies to apply before writing, or None (nothing changed) if the pool
        is too small. Shared blocks about to be written are copied so forks never see each other's KV.
        """
        state = self.seqs[seq_id]
        table = state.table
        if not 0 <= num_computed <= num_slots:
            raise ValueError(f"need 0 <= num_computed ({num_computed}) <= num_slots ({num_slots})")
        if num_computed > len(table) * self.block_size:
            raise ValueError(f"num_computed {num_computed} beyond the table ({len(table)} blocks)")
        if num_computed < state.num_hashed * self.block_size:
            raise ValueError(f"num_computed {num_computed} would overwrite committed, hashed blocks")
        num_new, written, cow = self._plan(table, num_computed, num_slots)
        if num_new + len(cow) > len(self.free_list):
            return None
        for i in written:
            if self.ref[table[i]] == 1:
                # Only reachable when a fork's other owner hashed this block and then released it.
                self._uncache(table[i])
        copies: CopyPairs = []
        for i in cow:
            src, dst = table[i], self._pop_free()
            self._release(src)  # ref was > 1, so src stays live for its other owners
            table[i] = dst
            copies.append((src, dst))
        table.extend(self._pop_free() for _ in range(num_new))
        return copies

    def commit(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """KV for token_ids[:num_computed] is valid: hash newly full blocks. O(new blocks) per call.

        A rollback of rejected speculative tokens is just a smaller num_computed; nothing moves.
        """
        state = self.seqs[seq_id]
        bs = self.block_size
        if num_computed > len(token_ids) or num_computed > len(state.table) * bs:
            raise ValueError(f"num_computed {num_computed} beyond tokens or table of {seq_id!r}")
        if not self.enable_prefix_caching:
            return
        for i in range(state.num_hashed, num_computed // bs):
            h = hash_block(state.last_hash, token_ids[i * bs : (i + 1) * bs])
            b = state.table[i]
            if self.block_hash[b] != h:
                self._uncache(b)
                self.block_hash[b] = h
            self.hash_to_block.setdefault(h, b)  # keep an existing mapping: no dedup, tables never change
            state.last_hash = h
            state.num_hashed = i + 1

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Child shares every parent block (copy-on-write later) and continues the parent's hash chain."""
        if child_id in self.seqs:
            raise ValueError(f"sequence {child_id!r} already allocated")
        parent = self.seqs[parent_id]
        for b in parent.table:
            self.ref[b] += 1
        self.seqs[child_id] = _SeqState(list(parent.table), parent.num_hashed, parent.last_hash)

    def free(self, seq_id: Hashable) -> None:
        """Release all blocks, tail first, so chain tails are evicted before the prefixes others share."""
        state = self.seqs.pop(seq_id)
        for b in reversed(state.table):
            self._release(b)

    # ---- queries ----

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The live table (not a copy): callers must not mutate it."""
        return self.seqs[seq_id].table

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self.seqs

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref 0, whether they still hold cached prefixes or not."""
        return len(self.free_list)

    def num_blocks_needed(self, seq_id: Hashable | None, num_computed: int, num_slots: int) -> int:
        """Free blocks append_slots would consume (new + copy-on-write); unknown seqs start empty."""
        table = self.seqs[seq_id].table if seq_id is not None and seq_id in self.seqs else []
        num_new, _, cow = self._plan(table, num_computed, num_slots)
        return num_new + len(cow)

    def num_allocated_slots(self) -> int:
        """Token slots held by live tables (shared blocks counted per sequence); for KV-waste stats."""
        return sum(len(s.table) for s in self.seqs.values()) * self.block_size

    def check_invariants(self) -> None:
        """Raise AssertionError if bookkeeping is inconsistent (tests and debug builds)."""
        live = {b for b in range(self.num_blocks) if self.ref[b] > 0}
        assert all(r >= 0 for r in self.ref), "negative ref count"
        assert all(self.ref[b] == 0 for b in self.free_list), "free-list block with ref != 0"
        assert set(self.free_list) | live | {0} == set(range(self.num_blocks)), "leaked block"
        assert 0 not in self.free_list and self.ref[0] == 0, "null block allocated"
        counts = Counter(b for s in self.seqs.values() for b in s.table)
        assert all(self.ref[b] == counts[b] for b in range(self.num_blocks)), "ref counts != table entries"
        for h, b in self.hash_to_block.items():
            assert self.block_hash[b] == h, f"hash map points at block {b} with a different hash"
        for seq_id, s in self.seqs.items():
            assert 0 <= s.num_hashed <= len(s.table), f"{seq_id!r}: num_hashed out of range"
            last = self.block_hash[s.table[s.num_hashed - 1]] if s.num_hashed else None
            assert s.last_hash == last, f"{seq_id!r}: last_hash out of sync"
