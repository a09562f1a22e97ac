"""Tests for kv_cache.block_manager: examples per method plus a stateful model with a simulated KV pool.

The state machine plays scheduler and worker: it writes token ids into a fake KV pool through the block
tables, applies the copy-on-write pairs, and checks that every committed position of every live sequence
still reads back its own token. That catches wrong sharing, missing CoW and stale prefix-cache hits.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest

from kv_cache.block_manager import BlockManager


def _snapshot(bm: BlockManager) -> tuple:
    return (
        list(bm.ref),
        list(bm.block_hash),
        list(bm.free_list),
        dict(bm.hash_to_block),
        copy.deepcopy(bm.seqs),
        bm.prefix_cache_hits,
        bm.prefix_cache_queries,
    )


def _run(bm: BlockManager, seq_id: str, tokens: list[int], num_slots: int | None = None) -> int:
    """Allocate, write every uncached token (plus lookahead up to num_slots) and commit them."""
    cached = bm.allocate(seq_id, tokens)
    assert bm.append_slots(seq_id, cached, num_slots or len(tokens)) == []
    bm.commit(seq_id, tokens, len(tokens))
    bm.check_invariants()
    return cached


# ---------------------------------------------------------------- examples


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        BlockManager(1, 4)
    with pytest.raises(ValueError):
        BlockManager(8, 0)
    bm = BlockManager(2, 1)
    assert bm.num_free_blocks == 1  # block 0 is reserved
    bm.check_invariants()


def test_null_block_never_allocated() -> None:
    bm = BlockManager(5, 2)
    bm.allocate("a", [1])
    assert bm.append_slots("a", 0, 8) == []
    assert sorted(bm.block_table("a")) == [1, 2, 3, 4]
    assert bm.num_free_blocks == 0
    assert bm.append_slots("a", 0, 9) is None
    bm.check_invariants()


def test_allocate_and_append_from_lru_head() -> None:
    bm = BlockManager(8, 4)
    assert bm.allocate("a", [1, 2, 3, 4, 5]) == 0
    assert bm.block_table("a") == [] and bm.has("a") and not bm.has("b")
    assert bm.num_blocks_needed("a", 0, 5) == 2
    assert bm.num_blocks_needed(None, 0, 5) == 2
    assert bm.append_slots("a", 0, 5) == []
    assert bm.block_table("a") == [1, 2]
    assert bm.num_free_blocks == 5
    assert bm.num_allocated_slots() == 8
    # Already covered: no new blocks; a longer request only adds the missing ones.
    assert bm.append_slots("a", 5, 8) == [] and bm.block_table("a") == [1, 2]
    assert bm.append_slots("a", 5, 9) == [] and bm.block_table("a") == [1, 2, 3]
    bm.check_invariants()


def test_allocate_duplicate_raises_and_changes_nothing() -> None:
    bm = BlockManager(8, 2)
    _run(bm, "a", [1, 2, 3, 4, 5])
    before = _snapshot(bm)
    with pytest.raises(ValueError):
        bm.allocate("a", [1, 2, 3, 4, 5])
    assert _snapshot(bm) == before


def test_append_slots_all_or_nothing_when_exhausted() -> None:
    bm = BlockManager(4, 2)  # 3 usable blocks
    bm.allocate("a", [1, 2, 3])
    assert bm.append_slots("a", 0, 4) == []
    bm.allocate("b", [7])
    before = _snapshot(bm)
    assert bm.num_blocks_needed("b", 0, 6) == 3
    assert bm.append_slots("b", 0, 6) is None
    assert _snapshot(bm) == before
    assert bm.append_slots("b", 0, 2) == [] and bm.num_free_blocks == 0
    bm.check_invariants()


def test_append_slots_rejects_bad_ranges() -> None:
    bm = BlockManager(8, 4)
    _run(bm, "a", [1, 2, 3, 4, 5, 6])  # blocks cover 8 slots, block 0 hashed
    for num_computed, num_slots in [(-1, 3), (7, 6), (9, 12), (3, 8)]:
        with pytest.raises(ValueError):
            bm.append_slots("a", num_computed, num_slots)
    with pytest.raises(KeyError):
        bm.append_slots("missing", 0, 1)
    bm.check_invariants()


def test_prefix_hits_reuse_blocks_and_cap_at_last_token() -> None:
    bm = BlockManager(16, 4)
    prompt = list(range(10))
    assert _run(bm, "a", prompt) == 0
    assert bm.allocate("b", prompt) == 8
    assert bm.block_table("b") == bm.block_table("a")[:2]
    # An exactly block-aligned prompt never has its last token cached.
    assert bm.allocate("c", prompt[:8]) == 4
    assert bm.block_table("c") == bm.block_table("a")[:1]
    # A different first block breaks the chain even if later blocks match.
    assert bm.allocate("d", [99, 1, 2, 3] + prompt[4:]) == 0
    assert bm.prefix_cache_queries == 10 + 10 + 8 + 10
    assert bm.prefix_cache_hits == 8 + 4
    a_blocks = list(bm.block_table("a"))
    bm.free("a")
    bm.free("b")
    bm.free("c")
    # Freed blocks keep their hash: still hits, with the same ids.
    assert bm.allocate("e", prompt + [42]) == 8
    assert bm.block_table("e") == a_blocks[:2]
    bm.check_invariants()


def test_hits_vanish_after_churn_without_breaking() -> None:
    bm = BlockManager(5, 2)  # 4 usable
    prompt = [1, 2, 3, 4, 5]
    _run(bm, "a", prompt)
    bm.free("a")
    assert bm.allocate("b", prompt) == 4
    bm.free("b")
    _run(bm, "churn", [9] * 8)  # reuses every block, evicting the cached prefix
    assert bm.num_free_blocks == 0
    assert set(bm.hash_to_block.values()) == set(bm.block_table("churn"))  # old prefix evicted
    bm.free("churn")
    assert bm.allocate("c", prompt) == 0
    bm.check_invariants()


def test_reused_free_block_loses_its_hash() -> None:
    bm = BlockManager(3, 2)  # 2 usable
    prompt = [1, 2, 3]
    _run(bm, "a", prompt)
    bm.free("a")
    assert bm.hash_to_block  # still cached while free
    bm.allocate("b", [7])
    assert bm.append_slots("b", 0, 4) == []  # pops both cached blocks; not committed yet
    assert bm.hash_to_block == {} and all(bm.block_hash[b] is None for b in bm.block_table("b"))
    assert bm.allocate("c", prompt) == 0
    bm.check_invariants()


def test_free_releases_in_reverse_to_lru_tail() -> None:
    bm = BlockManager(8, 2)
    _run(bm, "a", [1, 2, 3, 4, 5, 6])
    table = list(bm.block_table("a"))
    bm.free("a")
    assert list(bm.free_list)[-3:] == table[::-1]
    with pytest.raises(KeyError):
        bm.free("a")
    bm.check_invariants()
    assert bm.num_free_blocks == 7 and bm.num_allocated_slots() == 0


def test_lru_eviction_order() -> None:
    bm = BlockManager(4, 2)  # 3 usable: 1, 2, 3
    _run(bm, "a", [1, 2, 3])  # blocks [1, 2]
    bm.free("a")  # free list: 3, 2, 1  (2 = tail of "a" released first)
    assert list(bm.free_list) == [3, 2, 1]
    bm.allocate("b", [5])
    bm.append_slots("b", 0, 4)  # takes 3 then 2 -> evicts the tail block of "a"
    assert bm.block_table("b") == [3, 2]
    assert bm.allocate("c", [1, 2, 3]) == 2 and bm.block_table("c") == [1]
    bm.check_invariants()


def test_commit_rollback_only_hashes_committed_full_blocks() -> None:
    bm = BlockManager(16, 4)
    tokens = list(range(20))
    bm.allocate("a", tokens[:5])
    assert bm.append_slots("a", 0, 12) == []  # 5 prompt + 7 lookahead
    table = list(bm.block_table("a"))
    bm.commit("a", tokens, 6)  # most speculative tokens rejected
    assert bm.block_table("a") == table
    assert bm.seqs["a"].num_hashed == 1
    assert bm.block_hash[table[1]] is None
    bm.commit("a", tokens, 12)
    assert bm.seqs["a"].num_hashed == 3 and bm.block_table("a") == table
    with pytest.raises(ValueError):
        bm.commit("a", tokens, 13)  # beyond the table
    with pytest.raises(ValueError):
        bm.commit("a", tokens[:3], 12)  # beyond the tokens
    bm.check_invariants()


class _SpyTokens(Sequence):
    """Records every index / slice read, to prove commit is O(new blocks)."""

    def __init__(self, data: list[int]) -> None:
        self.data = data
        self.reads: list[slice | int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):  # type: ignore[override]
        self.reads.append(i)
        return self.data[i]


def test_commit_reads_only_new_blocks() -> None:
    bm = BlockManager(64, 4)
    tokens = list(range(200))
    bm.allocate("a", tokens[:1])
    bm.append_slots("a", 0, 200)
    bm.commit("a", tokens, 100)
    spy = _SpyTokens(tokens)
    bm.commit("a", spy, 110)
    read = set()
    for r in spy.reads:
        read.update(range(len(tokens))[r] if isinstance(r, slice) else [r])
    assert read == set(range(100, 108))
    spy.reads.clear()
    bm.commit("a", spy, 111)  # no new full block
    assert spy.reads == []


def test_duplicate_hash_keeps_existing_mapping() -> None:
    bm = BlockManager(16, 2)
    bm.allocate("a", [1])
    bm.allocate("b", [1])
    bm.append_slots("a", 0, 3)
    bm.append_slots("b", 0, 3)
    bm.commit("a", [1, 2, 3], 3)
    bm.commit("b", [1, 2, 3], 3)
    ba = bm.block_table("a")[0]
    bb = bm.block_table("b")[0]
    assert ba != bb and bm.block_hash[ba] == bm.block_hash[bb]  # same content, two blocks
    assert bm.hash_to_block[bm.block_hash[ba]] == ba  # first registration wins
    bm.check_invariants()


def test_fork_and_copy_on_write() -> None:
    bm = BlockManager(16, 4)
    tokens = [1, 2, 3, 4, 5, 6]
    _run(bm, "p", tokens)
    table = list(bm.block_table("p"))
    bm.fork("p", "c")
    assert bm.block_table("c") == table and bm.block_table("c") is not bm.block_table("p")
    assert [bm.ref[b] for b in table] == [2, 2]
    with pytest.raises(ValueError):
        bm.fork("p", "c")
    with pytest.raises(KeyError):
        bm.fork("nope", "x")
    # Writing position 6 touches the shared partial block 1 -> copy; the full block 0 stays shared.
    assert bm.num_blocks_needed("p", 6, 9) == 2  # one copy + one new block
    copies = bm.append_slots("p", 6, 9)
    assert copies is not None and len(copies) == 1
    src, dst = copies[0]
    assert src == table[1] and dst != src and bm.block_table("p") == [table[0], dst, bm.block_table("p")[2]]
    assert bm.block_table("c") == table and bm.ref[src] == 1 and bm.ref[table[0]] == 2
    # The child is now the sole owner of block 1: no copy for it.
    assert bm.append_slots("c", 6, 7) == []
    assert bm.block_table("c") == table
    bm.check_invariants()


def test_fork_of_full_blocks_needs_no_copy() -> None:
    bm = BlockManager(16, 4)
    _run(bm, "p", list(range(8)))
    bm.fork("p", "c")
    assert bm.num_blocks_needed("c", 8, 9) == 1
    assert bm.append_slots("c", 8, 9) == []
    assert bm.block_table("c")[:2] == bm.block_table("p")
    assert bm.seqs["c"].num_hashed == 2  # hashing state inherited
    bm.check_invariants()


def test_cow_all_or_nothing() -> None:
    bm = BlockManager(4, 4)  # 3 usable
    _run(bm, "p", [1, 2, 3], num_slots=8)  # 2 blocks
    bm.fork("p", "c")
    assert bm.num_free_blocks == 1
    before = _snapshot(bm)
    assert bm.num_blocks_needed("p", 3, 9) == 3  # 2 copies + 1 new
    assert bm.append_slots("p", 3, 9) is None
    assert _snapshot(bm) == before


def test_hash_of_released_fork_block_dropped_before_overwrite() -> None:
    """Parent hashes a block it shares with a fork, then leaves; the fork overwrites it in place."""
    bm = BlockManager(16, 2)
    bm.allocate("p", [1])
    bm.append_slots("p", 0, 2)  # parent writes [1, 2] into its block...
    bm.fork("p", "c")  # ...the fork happens before the parent commits
    bm.commit("p", [1, 2, 3], 2)
    shared = bm.block_table("p")[0]
    assert bm.block_hash[shared] is not None
    bm.free("p")
    assert bm.append_slots("c", 1, 2) == []  # child writes a different token 2 -> position 1, in place
    assert bm.block_table("c") == [shared] and bm.block_hash[shared] is None
    bm.commit("c", [1, 9, 3], 2)
    assert bm.allocate("q", [1, 2, 3]) == 0  # the parent's content is gone: no stale hit
    assert bm.allocate("r", [1, 9, 3]) == 2
    bm.check_invariants()


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(16, 2, enable_prefix_caching=False)
    _run(bm, "a", [1, 2, 3, 4, 5])
    assert bm.hash_to_block == {} and bm.seqs["a"].num_hashed == 0
    assert bm.allocate("b", [1, 2, 3, 4, 5]) == 0
    assert bm.prefix_cache_queries == 0 and bm.prefix_cache_hits == 0


def test_check_invariants_detects_corruption() -> None:
    def fresh() -> BlockManager:
        bm = BlockManager(8, 2)
        _run(bm, "a", [1, 2, 3, 4, 5])
        return bm

    bm = fresh()
    bm.ref[bm.block_table("a")[0]] += 1  # ref disagrees with tables
    with pytest.raises(AssertionError):
        bm.check_invariants()
    bm = fresh()
    bm.free_list.popitem()  # leaked block
    with pytest.raises(AssertionError):
        bm.check_invariants()
    bm = fresh()
    bm.free_list[bm.block_table("a")[0]] = None  # live block on the free list
    with pytest.raises(AssertionError):
        bm.check_invariants()
    bm = fresh()
    bm.ref[bm.block_table("a")[2]] = -1
    with pytest.raises(AssertionError):
        bm.check_invariants()
    bm = fresh()
    h = bm.block_hash[bm.block_table("a")[0]]
    assert h is not None
    bm.hash_to_block[h] = bm.block_table("a")[1]  # map points at a block with another hash
    with pytest.raises(AssertionError):
        bm.check_invariants()
    bm = fresh()
    bm.free_list[0] = None  # null block handed out
    with pytest.raises(AssertionError):
        bm.check_invariants()
