"""The scheduler's side of the block manager: the block tables it reads, and when the manager is asked.

The manager (`block_batch.py`) lives in this process or in an actor; either way this class is the one place
that talks to it, always waiting for the answer, and keeps what the scheduler reads between calls: each
sequence's block table (the manager sends only the tail that moved) and the free-block count. A step calls the
manager only when blocks change hands: a free, an admission, a table that must grow. A decode step inside the
blocks its sequences hold needs no call (its answer is known), and its commits wait for the next call. So a
remote manager costs one round trip per step at most and none for most decode steps, and an error surfaces at
the call that failed. Plain Python, no torch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kv_cache.block_batch import Admit, BlockService, BlockStep, BlockStepResult, Commit, Extend, Fork, Grant

log = logging.getLogger(__name__)


class BlockTables:
    def __init__(self, service: BlockService, num_blocks: int, block_size: int) -> None:
        self.service = service
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tables: dict[int, list[int]] = {}  # seq_id -> block table, as the manager last told it
        self.num_free_blocks = num_blocks - 1  # as of the manager's last answer
        self._known: dict[int, int] = {}  # tokens the manager holds (or is about to) per sequence
        self._commits: dict[int, Commit] = {}  # waiting for the next call
        self._free: list[int] = []  # waiting for the next call
        self._forks: list[Fork] = []  # waiting for the next call
        self._shared: set[int] = set()  # forked sequences whose next write may copy a shared block first

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """KV is valid for token_ids[:num_computed] (a rollback is just a smaller count); sent with the next call."""
        c = self._commits.get(seq_id)
        if c is None:
            c = self._commits[seq_id] = Commit(seq_id, [], 0)
        c.new_tokens.extend(token_ids[self._known[seq_id] :])
        c.num_computed = num_computed
        self._known[seq_id] = len(token_ids)

    def fork(self, parent: int, child: int, num_tokens: int) -> None:
        """`child` shares `parent`'s blocks, which hold the KV of its first `num_tokens`; sent with the next call.
        Both sequences' next writes go through the manager (a shared partial block is copied first)."""
        self.tables[child] = list(self.tables[parent])
        self._known[child] = num_tokens
        self._forks.append(Fork(parent, child, num_tokens))
        self._shared.update((parent, child))

    def free(self, seq_id: int) -> None:
        """Return a sequence's blocks with the next step's call; at once if no other sequence holds any, since
        then no step may follow. A failure then keeps them pending (the next call or a reset settles them)."""
        if self.tables.pop(seq_id, None) is None:
            return
        del self._known[seq_id]
        self._shared.discard(seq_id)
        self._free.append(seq_id)
        if not self.tables:
            try:
                self._call(BlockStep())
            except Exception:  # noqa: BLE001 - the caller's outputs are made; the next call raises it again
                log.exception("could not return freed KV blocks; they go with the next call")

    def step(self, extend: list[Extend], admit: list[Admit]) -> BlockStepResult:
        """Slots for the running sequences (preempting from the back when short) and admissions, in one call or
        none. (Copy-on-write needs a call too: a forked sequence's next write may copy a shared block.)"""
        held = self.tables
        grows = any(e.seq_id in self._shared or e.num_slots > len(held[e.seq_id]) * self.block_size for e in extend)
        if self._free or self._forks or admit or grows:
            return self._call(BlockStep(extend=extend, admit=admit))
        grants = [Grant(e.seq_id, e.num_slots, 0, len(held[e.seq_id]), [], []) for e in extend]
        return BlockStepResult(grants, [], self.num_free_blocks)

    def _call(self, request: BlockStep) -> BlockStepResult:
        request.fork, request.commit, request.free = self._forks, list(self._commits.values()), self._free
        result = self.service.step(request)  # may raise: then nothing here has changed
        self._forks, self._commits, self._free = [], {}, []
        self.num_free_blocks = result.num_free_blocks
        for seq_id in result.preempted:  # the manager has freed their blocks already
            del self.tables[seq_id], self._known[seq_id]
            self._shared.discard(seq_id)
        admitted = {a.seq_id: len(a.token_ids) for a in request.admit}
        for g in result.granted:
            table = self.tables.setdefault(g.seq_id, [])
            del table[g.table_from :]
            table.extend(g.blocks)
            if g.seq_id in admitted:
                self._known[g.seq_id] = admitted[g.seq_id]
            self._shared.discard(g.seq_id)  # its write position holds a block of its own now
        return result

    def reset(self) -> None:
        """Forget every table (the KV pages are lost), then empty the manager; a remote one that died is
        restarted. The tables go first, so that whatever the manager does, nothing here refers to it."""
        self.tables.clear()
        self._known.clear()
        self._forks, self._commits, self._free = [], {}, []
        self._shared.clear()
        self.num_free_blocks = self.num_blocks - 1
        self.service.reset()

    def num_allocated_slots(self) -> int:
        """Token slots held by live tables (shared blocks counted per sequence); for KV-waste stats."""
        return sum(len(t) for t in self.tables.values()) * self.block_size
