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
