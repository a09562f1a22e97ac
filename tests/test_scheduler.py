"""Scheduler unit tests: plain Python, no model."""

from __future__ import annotations

from engine.scheduler import Scheduler
from engine.sequence import SeqStatus, Sequence
from kv_cache.block_batch import BatchedBlockManager
from sampling.params import SamplingParams


def seq(i: int, n_prompt: int, max_tokens: int = 16, spec_k: int = 0) -> Sequence:
    s = Sequence(
        i, f"r{i}", list(range(100 * i, 100 * i + n_prompt)), n_prompt, SamplingParams(max_tokens=max_tokens), i
    )
    s.spec_k = spec_k
    return s


def make(num_blocks: int, block_size: int, **limits) -> tuple[Scheduler, BatchedBlockManager]:
    manager = BatchedBlockManager(num_blocks, block_size)
    limits = {"max_num_seqs": 4, "max_num_batched_tokens": 100, "max_model_len": 1000, **limits}
    return Scheduler(manager, num_blocks, block_size, **limits), manager


def check_mirror(sched: Scheduler, manager: BatchedBlockManager) -> None:
    """The scheduler's tables are exactly the manager's (it only ever sees deltas)."""
    assert sched.tables == {sid: st.table for sid, st in manager.bm.seqs.items()}
    assert sched.num_free_blocks == manager.bm.num_free_blocks
    manager.bm.check_invariants()


def run_step(sched: Scheduler, manager: BatchedBlockManager, sample_token: int = 7) -> list:
    """Pretend the model ran: advance num_computed, append a token for every sequence that can sample."""
    out = sched.schedule()
    check_mirror(sched, manager)
    for item in out.scheduled:
        s = item.seq
        done = item.completes_prefill
        s.num_computed += item.num_tokens
        if done:
            s.token_ids.append(sample_token)
        sched.commit(s)
    return out.scheduled


def test_long_prompt_is_prefilled_in_chunks_under_the_token_budget():
    sched, bm = make(64, 4, max_num_seqs=8, max_num_batched_tokens=16, max_model_len=1000)
    s = seq(1, 40)
    sched.add(s)
    chunks = []
    while s.num_output_tokens == 0:
        items = run_step(sched, bm)
        chunks.append(items[0].num_tokens)
        assert sum(i.num_tokens + i.num_lookahead for i in items) <= 16
    assert chunks == [16, 16, 8]


def test_decode_and_prefill_mix_in_one_step_fcfs():
    sched, bm = make(64, 4, max_num_seqs=8, max_num_batched_tokens=10, max_model_len=1000)
    a, b = seq(1, 6), seq(2, 30)
    sched.add(a)
    sched.add(b)
    run_step(sched, bm)  # a prefilled (6 tokens) + 4 tokens of b
    items = run_step(sched, bm)
    assert [(i.seq.seq_id, i.num_tokens) for i in items] == [(1, 1), (2, 9)]


def test_max_num_seqs_caps_running():
    sched, bm = make(64, 4, max_num_seqs=2, max_num_batched_tokens=100, max_model_len=1000)
    for i in range(1, 5):
        sched.add(seq(i, 4))
    items = run_step(sched, bm)
    assert [i.seq.seq_id for i in items] == [1, 2]
    assert len(sched.waiting) == 2


def test_lookahead_reserved_for_decoding_sequences_and_limited_by_max_tokens():
    sched, bm = make(64, 4)
    s = seq(1, 5, max_tokens=3, spec_k=5)
    sched.add(s)
    run_step(sched, bm)  # prefill: no lookahead
    items = sched.schedule().scheduled
    # 1 output so far, max 3: at most 1 more draft + the bonus token
    assert items[0].num_tokens == 1 and items[0].num_lookahead == 1
    assert len(sched.tables[1]) * 4 >= s.num_computed + 2


def test_preemption_when_pool_runs_dry_then_recompute():
    sched, bm = make(1 + 6, 4)  # 6 usable blocks = 24 slots
    old, new = seq(1, 8, max_tokens=50), seq(2, 8, max_tokens=50)
    sched.add(old)
    sched.add(new)
    run_step(sched, bm)  # both prefilled: 3 blocks each (8 prompt + 1 sampled needs slot 9 next step)
    for _ in range(12):
        run_step(sched, bm)
    assert sched.num_preemptions > 0
    assert new.num_preemptions > 0 and old.num_preemptions == 0, "the newest sequence is the victim"
    assert old.status is SeqStatus.RUNNING
    # The victim comes back once the old one is gone, recomputing prompt + output from scratch.
    sched.finish(old)
    n_tokens = len(new.token_ids)
    items = run_step(sched, bm)
    assert items[0].seq is new and new.num_computed == n_tokens
    check_mirror(sched, bm)
    assert bm.bm.num_free_blocks == 6 - len(sched.tables[2])


def test_drop_lookahead_before_preempting():
    sched, bm = make(1 + 3, 4)  # 12 slots
    s = seq(1, 7, max_tokens=50, spec_k=8)
    sched.add(s)
    run_step(sched, bm)
    items = sched.schedule().scheduled
    assert items[0].num_lookahead == 4  # 7 computed + 1 pending + 4 drafts = 12 slots: all that fits
    assert sched.num_preemptions == 0


def test_cancellation_frees_blocks_at_once():
    sched, bm = make(32, 4)
    a, b = seq(1, 10), seq(2, 10)
    sched.add(a)
    sched.add(b)
    run_step(sched, bm)
    sched.finish(a)
    assert bm.bm.num_free_blocks < 31  # b still runs: a's blocks go back with the next step
    sched.finish(b)
    assert bm.bm.num_free_blocks == 31
    check_mirror(sched, bm)
    assert not sched.has_work()


def test_shared_prompt_prefix_computed_once():
    sched, bm = make(32, 4)
    a = seq(1, 13)
    b = Sequence(2, "r2", list(a.token_ids), 13, SamplingParams(), 2)
    sched.add(a)
    run_step(sched, bm)
    sched.add(b)
    items = run_step(sched, bm)
    prefill_b = next(i for i in items if i.seq is b)
    assert prefill_b.num_tokens == 1  # 12 tokens (3 full blocks) came from the prefix cache
    assert sched.tables[2][:3] == sched.tables[1][:3]
