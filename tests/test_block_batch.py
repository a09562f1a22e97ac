"""The block manager's batch API: one call per step, driven by the real scheduler over random workloads."""

from __future__ import annotations

import random

import pytest

from engine.scheduler import Scheduler
from engine.sequence import Sequence
from kv_cache.block_batch import Admit, BatchedBlockManager, BlockStep, Extend
from sampling.params import SamplingParams
from tests.test_scheduler import check_mirror


class CountingManager(BatchedBlockManager):
    def __init__(self, *args):
        super().__init__(*args)
        self.calls = self.posts = 0

    def step(self, request):
        self.calls += 1
        return super().step(request)

    def post(self, request):
        self.posts += 1
        BatchedBlockManager.step(self, request)


@pytest.mark.parametrize("seed", range(12))
def test_random_workload_keeps_the_mirror_exact_and_frees_everything(seed):
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 16])
    manager = CountingManager(rng.randint(6, 40), block_size)
    sched = Scheduler(manager, manager.bm.num_blocks, block_size, 6, rng.randint(8, 64), 4096)
    shared = [rng.randrange(50) for _ in range(3 * block_size)]  # a common prefix for prefix hits
    seqs, next_id = [], 0
    for _ in range(150):
        if rng.random() < 0.3:
            prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(50) for _ in range(rng.randint(1, 20))]
            s = Sequence(next_id, str(next_id), prompt, len(prompt), SamplingParams(max_tokens=30), next_id)
            s.spec_k = rng.randint(0, 5)
            sched.add(s)
            seqs.append(s)
            next_id += 1
        calls, posts = manager.calls, manager.posts
        out = sched.schedule()
        assert manager.calls + manager.posts == calls + posts + 1, "exactly one manager call per step"
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
        sched.finish(s)
    sched.flush()
    check_mirror(sched, manager)
    assert manager.bm.num_free_blocks == manager.bm.num_blocks - 1 and not manager.tokens
    assert manager.posts > 0  # steps whose answer the mirror knew went without waiting


def test_a_retried_step_id_returns_the_same_answer_without_allocating_twice():
    manager = BatchedBlockManager(16, 4)
    step = BlockStep(7, admit=[Admit(1, list(range(10)), 10)])
    first = manager.step(step)
    free = manager.bm.num_free_blocks
    assert manager.step(step) is first and manager.bm.num_free_blocks == free
    later = manager.step(BlockStep(8, extend=[Extend(1, 10, 12, 11)]))
    assert later.granted[0].num_slots == 12 and later.granted[0].table_from == 2


def test_admissions_stop_at_the_first_that_does_not_fit_and_preemption_takes_the_newest():
    manager = BatchedBlockManager(1 + 4, 4)  # 16 slots
    r = manager.step(BlockStep(0, admit=[Admit(1, [1] * 6, 6), Admit(2, [2] * 9, 9), Admit(3, [3], 1)]))
    assert [g.seq_id for g in r.granted] == [1] and r.num_free_blocks == 2  # 2 did not fit, so 3 waits too
    r = manager.step(BlockStep(1, admit=[Admit(2, [2] * 5, 5)]))
    assert [g.seq_id for g in r.granted] == [2] and r.num_free_blocks == 0
    # 1 needs a third block even without lookahead: the newest (2) is preempted, then 1 runs without lookahead
    r = manager.step(BlockStep(2, extend=[Extend(1, 6, 10, 9), Extend(2, 5, 9, 9)], admit=[Admit(3, [3], 1)]))
    assert r.preempted == [2] and [(g.seq_id, g.num_slots) for g in r.granted] == [(1, 9)]
    assert r.num_free_blocks == 1  # 2's two blocks came back; 1 took one of them, and nobody was admitted


def test_a_decoding_sequence_waits_for_the_manager_only_when_blocks_change_hands():
    manager = CountingManager(16, 8)
    sched = Scheduler(manager, 16, 8, 4, 64, 4096)
    s = Sequence(0, "0", [1, 2, 3, 4, 5, 6], 6, SamplingParams(max_tokens=20), 0)
    s.spec_k = 2
    sched.add(s)
    waited_when = []
    for _ in range(12):
        calls, blocks = manager.calls, len(sched.tables.get(0, []))
        item = sched.schedule().scheduled[0]
        check_mirror(sched, manager)
        waited_when.append((manager.calls > calls, len(sched.tables[0]) > blocks))
        s.num_computed += item.num_tokens + (item.num_lookahead and 1)  # one draft of each step accepted
        s.token_ids.extend([9] * (1 + (item.num_lookahead and 1)))
        sched.commit(s)
    assert all(waited == grew for waited, grew in waited_when)
    assert 0 < manager.calls < manager.posts  # the admission and each new block waited, the other steps not
