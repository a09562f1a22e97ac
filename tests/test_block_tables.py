"""The scheduler's side of the block manager when the manager fails: nothing is lost or applied twice."""

from __future__ import annotations

import pytest

from kv_cache.block_batch import Admit, BatchedBlockManager, Extend
from kv_cache.block_tables import BlockTables


class FlakyManager(BatchedBlockManager):
    """A manager whose next calls raise, as a dead actor's client does."""

    def __init__(self, *args):
        super().__init__(*args)
        self.failing = False

    def step(self, request):
        if self.failing:
            raise RuntimeError("block manager lost")
        return super().step(request)


def test_a_failed_call_changes_nothing_and_the_same_step_can_be_sent_again():
    manager = FlakyManager(16, 4)
    tables = BlockTables(manager, 16, 4)
    tables.step([], [Admit(1, list(range(6)), 6)])
    tables.commit(1, list(range(7)), 6)
    before = {k: list(v) for k, v in tables.tables.items()}
    manager.failing = True
    with pytest.raises(RuntimeError):
        tables.step([Extend(1, 6, 9, 7)], [])  # needs a third block: a call
    assert tables.tables == before and tables.num_free_blocks == 13
    manager.failing = False
    result = tables.step([Extend(1, 6, 9, 7)], [])
    assert result.granted[0].num_slots == 9 and tables.tables[1] == manager.bm.block_table(1)
    assert manager.tokens[1] == list(range(7))  # the commit went exactly once


def test_frees_that_could_not_be_sent_go_with_the_next_call_and_a_reset_empties_everything():
    manager = FlakyManager(16, 4)
    tables = BlockTables(manager, 16, 4)
    tables.step([], [Admit(1, list(range(6)), 6)])
    manager.failing = True
    tables.free(1)  # the last sequence with blocks: sent at once, fails, is kept (and logged)
    assert not tables.tables and manager.bm.has(1)
    manager.failing = False
    tables.step([], [Admit(2, [9, 9], 2)])
    assert not manager.bm.has(1) and manager.bm.num_free_blocks == 14
    tables.reset()
    assert not tables.tables and tables.num_free_blocks == 15 and manager.bm.num_free_blocks == 15


def test_a_fork_shares_the_prompt_blocks_and_each_first_write_copies_the_shared_partial_block():
    manager = BatchedBlockManager(16, 4)
    tables = BlockTables(manager, 16, 4)
    prompt = list(range(6))  # a full block and a partial one
    tables.step([], [Admit(1, prompt, 6, reserve=2)])
    tables.commit(1, prompt + [100], 6)
    tables.fork(1, 2, 6)
    tables.fork(1, 3, 6)
    tables.commit(2, prompt + [200], 6)
    tables.commit(3, prompt + [300], 6)
    assert tables.tables[2] == tables.tables[1] == tables.tables[3]
    # inside held blocks, yet a call: the shared partial block is copied before anyone writes it
    result = tables.step([Extend(s, 6, 7, 7) for s in (1, 2, 3)], [])
    copies = [c for g in result.granted for c in g.copies]
    assert len(copies) == 2 and len({t[1] for t in tables.tables.values()}) == 3
    assert len({t[0] for t in tables.tables.values()}) == 1  # the full prompt block stays shared
    assert manager.tokens[2] == prompt + [200] and manager.tokens[3] == prompt + [300]
    manager.bm.check_invariants()
    calls = []
    manager.step = lambda request, step=manager.step: calls.append(request) or step(request)
    tables.step([Extend(s, 7, 8, 8) for s in (1, 2, 3)], [])  # now each writes its own block: no call
    assert calls == []
    for s in (1, 2, 3):
        tables.free(s)
    assert manager.bm.num_free_blocks == 15


def test_an_admission_that_leaves_no_room_for_its_forks_waits():
    manager = BatchedBlockManager(4, 4)
    tables = BlockTables(manager, 4, 4)
    assert tables.step([], [Admit(1, list(range(8)), 8, reserve=2)]).granted == []
    assert tables.step([], [Admit(1, list(range(8)), 8, reserve=1)]).granted[0].num_slots == 8
