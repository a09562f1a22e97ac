"""Property-based test of the block manager: a hypothesis state machine acting as scheduler and worker."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kv_cache.block_manager import BlockManager
from tests.test_block_manager import _snapshot

# ---------------------------------------------------------------- stateful model

VOCAB = st.integers(0, 3)  # small vocabulary -> genuine prefix matches beyond the shared bases


@dataclass
class _Seq:
    tokens: list[int]  # known tokens; KV valid for tokens[:committed]; len > committed
    committed: int
    inflight: list[int] | None = None  # tokens written by the step in flight (prompt + drafts)
    write_end: int = 0


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(2, 16),
        block_size=st.integers(1, 4),
        caching=st.booleans() | st.just(True),
        bases=st.lists(st.lists(VOCAB, max_size=16), min_size=1, max_size=3),
    )
    def setup(self, num_blocks: int, block_size: int, caching: bool, bases: list[list[int]]) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.bs = block_size
        self.bases = bases
        self.model: dict[int, _Seq] = {}
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.next_id = 0
        self.content: dict[int, list[int]] = {}  # block hash -> the tokens it was committed with

    # -- helpers

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _pick(self, data: st.DataObject, inflight: bool | None = None) -> int:
        return data.draw(st.sampled_from(self._ids(inflight)))

    def _ids(self, inflight: bool | None = None) -> list[int]:
        """Live ids, optionally only those with (True) or without (False) a step in flight."""
        return sorted(i for i, s in self.model.items() if inflight in (None, s.inflight is not None))

    def _has(self, inflight: bool | None = None) -> bool:
        return bool(self._ids(inflight))

    def _registered(self, blocks: list[int]) -> bool:
        """True if each block is the one the prefix cache maps its hash to."""
        hash_to_block, block_hash = self.bm.hash_to_block, self.bm.block_hash
        return all(block_hash[b] is not None and hash_to_block.get(block_hash[b]) == b for b in blocks)

    def _check_admission(self, sid: int, tokens: list[int], cached: int, before: tuple) -> None:
        bm, bs = self.bm, self.bs
        assert cached % bs == 0 and 0 <= cached <= max(0, len(tokens) - 1)
        if not bm.enable_prefix_caching:
            assert cached == 0
        table = bm.block_table(sid)
        assert len(table) == cached // bs and len(set(table)) == len(table)
        ref_before = before[0]
        for b in table:
            assert bm.ref[b] == ref_before[b] + 1
        assert bm.num_free_blocks == len(before[2]) - sum(ref_before[b] == 0 for b in table)
        self.model[sid] = _Seq(list(tokens), cached)
        self._check_kv(sid)

    def _check_kv(self, sid: int) -> None:
        s, table, bs = self.model[sid], self.bm.block_table(sid), self.bs
        assert len(table) * bs >= s.committed
        got = [self.kv[table[p // bs]][p % bs] for p in range(s.committed)]
        assert got == s.tokens[: s.committed]

    # -- rules

    @precondition(lambda self: len(self.model) < 5)
    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        base = data.draw(st.sampled_from(self.bases))
        suffix = data.draw(st.lists(VOCAB, min_size=1, max_size=6))
        prompt = base[: data.draw(st.integers(0, len(base)))] + suffix
        sid = self._new_id()
        before = _snapshot(self.bm)
        cached = self.bm.allocate(sid, prompt)
        self._check_admission(sid, prompt, cached, before)
        # Re-allocating a live id fails and changes nothing.
        before = _snapshot(self.bm)
        with pytest.raises(ValueError):
            self.bm.allocate(sid, prompt)
        assert _snapshot(self.bm) == before
        if data.draw(st.booleans()) and self._schedule(sid, data):  # often prefilled right away
            self._finish(sid, data)

    @precondition(lambda self: len(self.model) < 5 and any(s.committed >= 1 for s in self.model.values()))
    @rule(data=st.data())
    def allocate_same_prefix(self, data: st.DataObject) -> None:
        """A new request sharing a committed prefix gets the same leading blocks back."""
        src_id = data.draw(st.sampled_from(sorted(i for i, s in self.model.items() if s.committed >= 1)))
        src = self.model[src_id]
        prompt = src.tokens[: src.committed] + [data.draw(VOCAB)]
        n = src.committed // self.bs
        src_blocks = list(self.bm.block_table(src_id)[:n])
        expect_hit = self.bm.enable_prefix_caching and self._registered(src_blocks)
        sid = self._new_id()
        before = _snapshot(self.bm)
        cached = self.bm.allocate(sid, prompt)
        self._check_admission(sid, prompt, cached, before)
        if expect_hit:
            assert cached == n * self.bs
            assert self.bm.block_table(sid) == src_blocks

    @precondition(lambda self: self._has(inflight=False))
    @rule(data=st.data())
    def schedule(self, data: st.DataObject) -> None:
        """Start a step; other ops (fork, free, preempt, ...) may interleave before it finishes."""
        self._schedule(self._pick(data, inflight=False), data)

    @precondition(lambda self: self._has(inflight=True))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        self._finish(self._pick(data, inflight=True), data)

    @precondition(lambda self: self._has(inflight=False))
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """A whole engine step for one sequence (the common case, so the pool churns)."""
        sid = self._pick(data, inflight=False)
        if self._schedule(sid, data):
            self._finish(sid, data)

    def _schedule(self, sid: int, data: st.DataObject) -> bool:
        """append_slots for a chunk of real tokens (+ draft lookahead), then the worker writes them."""
        bm, bs = self.bm, self.bs
        s = self.model[sid]
        c, n_left = s.committed, len(s.tokens) - s.committed
        n_real = data.draw(st.integers(1, n_left))
        k = data.draw(st.integers(0, 3)) if n_real == n_left else 0
        ext = s.tokens + data.draw(st.lists(VOCAB, min_size=k, max_size=k))
        end = c + n_real + k
        needed = bm.num_blocks_needed(sid, c, end)
        before = _snapshot(bm)
        old = list(bm.block_table(sid))
        copies = bm.append_slots(sid, c, end)
        if copies is None:
            assert needed > len(before[2])
            assert _snapshot(bm) == before
            return False
        assert needed <= len(before[2])
        assert bm.num_free_blocks == len(before[2]) - needed
        ref_before, free_before = before[0], set(before[2])
        table = bm.block_table(sid)
        assert len(table) == max(len(old), -(-end // bs))
        assert table[: c // bs] == old[: c // bs]  # valid KV never moves
        changed = [(old[i], table[i]) for i in range(len(old)) if old[i] != table[i]]
        assert sorted(changed) == sorted(copies)
        for i in range(len(old)):
            if old[i] != table[i]:
                assert c // bs <= i < -(-end // bs)  # only blocks written this step are copied
        for src, dst in copies:
            assert src != dst and ref_before[src] > 1 and dst in free_before
        assert all(b in free_before for b in table[len(old) :])
        assert len(set(table)) == len(table)
        for src, dst in copies:
            self.kv[dst] = list(self.kv[src])
        for p in range(c, end):
            b = table[p // bs]
            assert bm.ref[b] == 1, "about to write a block another sequence can read"
            self.kv[b][p % bs] = ext[p]
        s.inflight, s.write_end = ext, end
        return True

    def _finish(self, sid: int, data: st.DataObject) -> None:
        """Verification accepts a prefix of what was written: commit (smaller = rollback)."""
        bm = self.bm
        s = self.model[sid]
        assert s.inflight is not None
        new_c = data.draw(st.integers(s.committed, s.write_end))
        if new_c >= len(s.tokens):
            tokens = s.inflight[:new_c] + [data.draw(VOCAB)]  # accepted drafts + bonus token
        else:
            tokens = s.tokens
        before = _snapshot(bm)
        table = list(bm.block_table(sid))
        bm.commit(sid, tokens, new_c)
        assert bm.block_table(sid) == table
        for i, b in enumerate(table[: new_c // self.bs] if bm.enable_prefix_caching else []):
            h = bm.block_hash[b]
            assert h is not None
            self.content[h] = tokens[i * self.bs : (i + 1) * self.bs]
        assert bm.ref == before[0] and set(bm.free_list) == set(before[2])
        s.tokens, s.committed, s.inflight = tokens, new_c, None

    @precondition(lambda self: 0 < len(self.model) < 5)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        bm = self.bm
        pid = self._pick(data)
        p = self.model[pid]
        cid = self._new_id()
        before = _snapshot(bm)
        bm.fork(pid, cid)
        assert bm.block_table(cid) == bm.block_table(pid)
        assert all(bm.ref[b] == before[0][b] + 1 for b in bm.block_table(pid))
        assert list(bm.free_list) == before[2]
        # The child diverges right after the committed prefix.
        self.model[cid] = _Seq(p.tokens[: p.committed] + [data.draw(VOCAB)], p.committed)

    @precondition(lambda self: self._has())
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        bm = self.bm
        sid = self._pick(data)
        old = list(bm.block_table(sid))
        ref_before = list(bm.ref)
        bm.free(sid)
        del self.model[sid]
        released = [b for b in reversed(old) if ref_before[b] == 1]
        assert list(bm.free_list)[len(bm.free_list) - len(released) :] == released
        assert not bm.has(sid)
        before = _snapshot(bm)
        with pytest.raises(KeyError):
            bm.free(sid)  # no double free
        assert _snapshot(bm) == before

    @precondition(lambda self: self._has())
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        """Free, then re-admit with every known token; its own freed blocks are still cached."""
        bm, bs = self.bm, self.bs
        sid = self._pick(data)
        s = self.model.pop(sid)
        n = min(s.committed // bs, (len(s.tokens) - 1) // bs)
        own = list(bm.block_table(sid)[:n])
        expect_hit = bm.enable_prefix_caching and self._registered(own)
        bm.free(sid)
        before = _snapshot(bm)
        cached = bm.allocate(sid, s.tokens)
        self._check_admission(sid, s.tokens, cached, before)
        if expect_hit:  # may hit further: later blocks can match other cached sequences
            assert cached >= n * bs and bm.block_table(sid)[:n] == own

    # -- invariants

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "bm"):
            return
        bm, bs = self.bm, self.bs
        bm.check_invariants()
        assert set(bm.seqs) == set(self.model)
        live = {b for sid in self.model for b in bm.block_table(sid)}
        assert 0 not in live
        assert bm.num_free_blocks + len(live) == bm.num_blocks - 1
        assert bm.num_allocated_slots() == bs * sum(len(bm.block_table(sid)) for sid in self.model)
        assert 0 <= bm.prefix_cache_hits <= bm.prefix_cache_queries
        for h, b in bm.hash_to_block.items():  # a cached block still holds what was committed into it
            assert self.kv[b] == self.content[h]
        for sid, s in self.model.items():
            assert len(s.tokens) > s.committed
            self._check_kv(sid)
            if bm.enable_prefix_caching:  # every full committed block is hashed
                assert all(bm.block_hash[b] is not None for b in bm.block_table(sid)[: s.committed // bs])

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for sid in list(self.model):
            self.bm.free(sid)
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.bm.num_blocks - 1  # no leak
        assert not any(self.bm.ref) and self.bm.num_allocated_slots() == 0


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
