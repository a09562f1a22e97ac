"""The block manager's batch protocol: one call per step at most, driven by the real scheduler over random
workloads, and none for a decode step inside the blocks a sequence holds."""

from __future__ import annotations

import random

import pytest

from engine.scheduler import Scheduler
from engine.sequence import Sequence
from kv_cache.block_batch import Admit, BatchedBlockManager, BlockStep, Commit, Extend
from sampling.params import SamplingParams
from tests.test_scheduler import check_mirror


class CountingManager(BatchedBlockManager):
    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    def step(self, request):
        self.calls += 1
        return super().step(request)


@pytest.mark.parametrize("seed", range(12))
def test_random_workload_keeps_the_mirror_exact_and_frees_everything(seed):
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 16])
    manager = CountingManager(rng.randint(6, 40), block_size)
    sched = Scheduler(manager, manager.bm.num_blocks, block_size, 6, rng.randint(8, 64), 4096)
    shared = [rng.randrange(50) for _ in range(3 * block_size)]  # a common prefix for prefix hits
    seqs, next_id, skipped = [], 0, 0
    for _ in range(150):
        if rng.random() < 0.3:
            prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(50) for _ in range(rng.randint(1, 20))]
            s = Sequence(next_id, str(next_id), prompt, len(prompt), SamplingParams(max_tokens=30), next_id)
            s.spec_k = rng.randint(0, 5)
            sched.add(s)
            seqs.append(s)
            next_id += 1
        calls = manager.calls
        out = sched.schedule()
        assert manager.calls - calls <= 1, "one manager call per step at most"
        skipped += manager.calls == calls
        check_mirror(sched, manager)
        assert sum(i.num_tokens + i.num_lookahead for i in out.scheduled) <= sched.max_num_batched_tokens
        for item in out.scheduled:
            s = item.seq
            assert len(sched.tables[s.seq_id]) * block_size >= s.num_computed + item.num_tokens + item.num_lookahead
            s.num_computed += item.num_tokens
            if item.completes_prefill:
                accepted = rng.randint(0, item.num_lookahead)  # the rest of the drafts were rejected
                s.token_ids.extend(rng.randrange(50) for _ in range(accepted + 1))
                s.num_computed += accepted
            if s.num_output_tokens >= 30 or rng.random() < 0.03:  # finished or cancelled
                sched.finish(s)
            else:
                sched.commit(s)
        if rng.random() < 0.05 and sched.waiting:  # cancel a waiting one
            sched.finish(sched.waiting[-1])
    for s in list(sched.running) + list(sched.waiting):
        sched.finish(s)  # the last one to hold blocks sends the frees at once
    check_mirror(sched, manager)
    assert manager.bm.num_free_blocks == manager.bm.num_blocks - 1 and not manager.tokens
    assert skipped > 0  # steps whose answer the tables knew made no call


def test_a_grant_carries_only_the_tail_of_the_table_that_moved():
    manager = BatchedBlockManager(16, 4)
    manager.step(BlockStep(admit=[Admit(1, list(range(10)), 10)]))
    later = manager.step(BlockStep(extend=[Extend(1, 10, 12, 11)]))
    assert later.granted[0].num_slots == 12 and later.granted[0].table_from == 2
    assert later.granted[0].blocks == manager.bm.block_table(1)[2:]


def test_a_finished_sequences_last_commit_is_hashed_before_its_blocks_are_freed():
    manager = BatchedBlockManager(16, 4)
    manager.step(BlockStep(admit=[Admit(1, list(range(6)), 6)]))
    manager.step(BlockStep(commit=[Commit(1, [6, 7, 8], 8)], free=[1]))  # two full blocks, then finished
    manager.step(BlockStep(admit=[Admit(2, list(range(9)) + [50], 10)]))
    assert manager.bm.prefix_cache_hits == 8  # both blocks of the finished sequence were reused


def test_admissions_stop_at_the_first_that_does_not_fit_and_preemption_takes_the_newest():
    manager = BatchedBlockManager(1 + 4, 4)  # 16 slots
    r = manager.step(BlockStep(admit=[Admit(1, [1] * 6, 6), Admit(2, [2] * 9, 9), Admit(3, [3], 1)]))
    assert [g.seq_id for g in r.granted] == [1] and r.num_free_blocks == 2  # 2 did not fit, so 3 waits too
    r = manager.step(BlockStep(admit=[Admit(2, [2] * 5, 5)]))
    assert [g.seq_id for g in r.granted] == [2] and r.num_free_blocks == 0
    # 1 needs a third block even without lookahead: the newest (2) is preempted, then 1 runs without lookahead
    r = manager.step(BlockStep(extend=[Extend(1, 6, 10, 9), Extend(2, 5, 9, 9)], admit=[Admit(3, [3], 1)]))
    assert r.preempted == [2] and [(g.seq_id, g.num_slots) for g in r.granted] == [(1, 9)]
    assert r.num_free_blocks == 1  # 2's two blocks came back; 1 took one of them, and nobody was admitted


def test_a_decoding_sequence_calls_the_manager_only_when_blocks_change_hands():
    manager = CountingManager(16, 8)
    sched = Scheduler(manager, 16, 8, 4, 64, 4096)
    s = Sequence(0, "0", [1, 2, 3, 4, 5, 6], 6, SamplingParams(max_tokens=20), 0)
    s.spec_k = 2
    sched.add(s)
    called_when = []
    for _ in range(12):
        calls, blocks = manager.calls, len(sched.tables.get(0, []))
        item = sched.schedule().scheduled[0]
        check_mirror(sched, manager)
        called_when.append((manager.calls > calls, len(sched.tables[0]) > blocks))
        s.num_computed += item.num_tokens + (item.num_lookahead and 1)  # one draft of each step accepted
        s.token_ids.extend([9] * (1 + (item.num_lookahead and 1)))
        sched.commit(s)
    assert all(called == grew for called, grew in called_when)
    assert 0 < manager.calls < len(called_when) / 2  # the admission and each new block called, the others not
    sched.finish(s)  # the only sequence: its blocks go back at once, its commits first
    assert manager.bm.num_free_blocks == 15 and manager.bm.hash_to_block
