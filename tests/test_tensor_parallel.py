"""Tensor parallelism over Ray shard actors (gloo on CPU) against the single-process engine.

The default model has 3 KV heads, so TP=2 exercises the uneven split by whole GQA groups (2 + 1 KV heads with
their 6 + 3 query heads). One TP=2 group is shared by the module; the last test kills a shard and restarts it.
"""

from __future__ import annotations

import time

import pytest
import torch

from engine.llm_engine import LLMEngine
from model.config import EngineConfig
from model.kv_pages import KVPages
from model.loader import load_arch
from model.parallel import ParallelContext, rank_kv_cache_bytes
from model.runner import StepInput
from sampling.params import SamplingParams

ray = pytest.importorskip("ray")

from deployments.sharded_runner import ShardedRunner, ShardFailure  # noqa: E402

CONFIG = EngineConfig(kv_cache_gib=0.0625, max_model_len=1024, max_num_batched_tokens=256)
PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):\n    ",
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three uses of Python dictionaries, one sentence each."}],
]
MAX_TOKENS = 24


# ---- the partition (no Ray) ---------------------------------------------------------------------------


def test_span_splits_by_whole_units_first_ranks_take_the_rest():
    spans = [ParallelContext(r, 2).span(3) for r in range(2)]
    assert spans == [(0, 2), (2, 1)]
    # 9 query heads of dim 64 in groups of 3: rank 0 gets 6 heads (rows 0..383), rank 1 3 heads (384..575).
    assert [ParallelContext(r, 2).span(9 * 64, unit=3 * 64) for r in range(2)] == [(0, 384), (384, 192)]
    assert [ParallelContext(r, 2).span(1536) for r in range(2)] == [(0, 768), (768, 768)]  # even where it divides
    for n, ws in [(7, 3), (8, 4), (5, 5), (12, 5), (1, 1)]:
        spans = [ParallelContext(r, ws).span(n) for r in range(ws)]
        assert sum(size for _, size in spans) == n
        assert all(a + s == b for (a, s), (b, _) in zip(spans, spans[1:])), "slices must be contiguous"
        assert max(s for _, s in spans) - min(s for _, s in spans) <= 1
        assert ParallelContext(0, ws).max_span(n) == max(s for _, s in spans)
    with pytest.raises(ValueError):
        ParallelContext(0, 2).span(10, unit=3)


def test_uneven_kv_heads_give_every_rank_the_same_block_count():
    budget, layers, bs, d = (64 << 20) + 12345, 30, 16, 64
    counts = set()
    for r in range(2):
        tp = ParallelContext(r, 2)
        local = tp.span(3)[1]
        counts.add(KVPages.blocks_for_budget(rank_kv_cache_bytes(budget, 3, tp), layers, bs, local, d, torch.float32))
    assert counts == {KVPages.blocks_for_budget(budget, layers, bs, 2, d, torch.float32)}


# ---- real model, real Ray -----------------------------------------------------------------------------


RAY_CPUS = 4


@pytest.fixture(scope="module")
def engine_tp1() -> LLMEngine:
    return LLMEngine(CONFIG)


@pytest.fixture(scope="module")
def sharded(local_ray):
    runner = ShardedRunner.from_config(CONFIG, tensor_parallel_size=2, cpus_per_shard=1)
    yield runner
    runner.shutdown()


def _scratch_table(engine_tp1: LLMEngine, sharded: ShardedRunner) -> list[int]:
    """Blocks at the top of both pools, away from those the engines hand out first."""
    top = min(engine_tp1.runner.num_blocks, sharded.num_blocks)
    return list(range(top - 4, top))


def _prefill_and_decode(runner, ids: list[int], table: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    prefill = runner.execute([StepInput(ids, 0, table, len(ids))])
    step = runner.execute([StepInput([int(prefill[-1].argmax())], len(ids), table, 1)])
    return prefill, step


def test_tp2_logits_match_tp1(engine_tp1, sharded, model_folder):
    arch = load_arch(model_folder)
    # rank 0 holds 2 of the 3 KV heads and sizes the pool for both ranks
    assert sharded.num_blocks == KVPages.blocks_for_budget(
        int(CONFIG.kv_cache_gib * (1 << 30)), arch.num_layers, CONFIG.block_size, 2, arch.head_dim, torch.float32
    )
    ids = list(engine_tp1.prepare('def quicksort(items):\n    """Sort a list in place."""\n').prompt_token_ids)
    table = _scratch_table(engine_tp1, sharded)
    ref_prefill, ref_step = _prefill_and_decode(engine_tp1.runner, ids, table)
    got_prefill, got_step = _prefill_and_decode(sharded, ids, table)
    assert got_prefill.dtype == torch.float32 and got_prefill.shape == ref_prefill.shape
    assert (got_prefill - ref_prefill).abs().max().item() < 1e-3
    assert (got_step - ref_step).abs().max().item() < 1e-3


def test_tp2_hidden_states_match_tp1(engine_tp1, sharded):
    ids = list(engine_tp1.prepare("Once upon a time there was a").prompt_token_ids)
    table = _scratch_table(engine_tp1, sharded)
    item = StepInput(ids, 0, table, 1, num_hidden=3)
    ref = engine_tp1.runner.execute_with_hidden([item])
    got = sharded.execute_with_hidden([item])
    assert got.hidden is not None and got.hidden.shape == ref.hidden.shape == (3, engine_tp1.arch.hidden_size)
    assert (got.hidden - ref.hidden).abs().max().item() < 1e-3
    assert (got.logits - ref.logits).abs().max().item() < 1e-3


def test_tp2_greedy_tokens_match_tp1(engine_tp1, sharded):
    engine_tp2 = LLMEngine(CONFIG, runner=sharded)
    params = SamplingParams(max_tokens=MAX_TOKENS)
    ref = [o.output_token_ids for o in engine_tp1.generate(PROMPTS, params)]
    got = [o.output_token_ids for o in engine_tp2.generate(PROMPTS, params)]
    assert got == ref
    assert all(len(r) > 4 for r in ref)
    assert engine_tp2.block_manager.stats()["num_free_blocks"] == sharded.num_blocks - 1, "KV blocks leaked"


def test_dead_shard_raises_and_restart_recovers(engine_tp1, sharded):
    ids = list(engine_tp1.prepare("Once upon a time").prompt_token_ids)
    table = _scratch_table(engine_tp1, sharded)
    ref = engine_tp1.runner.execute([StepInput(ids, 0, table, 1)])
    ray.kill(sharded.workers[1], no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(ShardFailure):
        sharded.execute([StepInput(ids, 0, table, 1)])
    assert time.monotonic() - t0 < 30
    with pytest.raises(ShardFailure, match="restart"):  # stays failed, without touching the actors
        sharded.execute([StepInput(ids, 0, table, 1)])
    sharded.restart()
    sharded.check_health()
    got = sharded.execute([StepInput(ids, 0, table, 1)])
    assert (got - ref).abs().max().item() < 1e-3
