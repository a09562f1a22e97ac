"""n > 1 sequences of one request: the prompt prefilled once, its KV blocks shared by the n sequences (copy-on-write
for a shared partial block), each sequence sampling on its own random stream and finishing on its own."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from sampling.params import SamplingParams

CONFIG = {"max_model_len": 512, "kv_cache_gib": 0.05}
PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number, computed iteratively."""\n'


def run(engine, prompt, params: SamplingParams, request_id: str) -> tuple[dict[int, list[int]], int]:
    """Every sequence's output tokens by index, and the most KV blocks live at once."""
    engine.add_request(prompt, params, request_id=request_id)
    outputs: dict[int, list[int]] = {}
    peak = 0
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == request_id
            if out.finished:
                assert out.index not in outputs
                outputs[out.index] = out.output_token_ids
        bm = engine.block_manager.bm
        peak = max(peak, bm.num_blocks - 1 - bm.num_free_blocks)
    engine.block_manager.bm.check_invariants()
    return outputs, peak


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    return tokenizer(PROMPT)["input_ids"]


def test_greedy_n_equals_single_request_and_shares_the_prompt_blocks(make_engine, prompt_ids):
    engine = make_engine(**CONFIG)
    bm = engine.block_manager.bm
    bm.enable_prefix_caching = False  # each request computes its prompt: blocks counted are its own
    try:
        greedy = dict(max_tokens=12, ignore_eos=True)
        single, single_peak = run(engine, prompt_ids, SamplingParams(**greedy), "one")
        queried = engine.scheduler.num_prefix_queried_tokens
        many, many_peak = run(engine, prompt_ids, SamplingParams(n=3, **greedy), "three")
    finally:
        bm.enable_prefix_caching = True
    assert sorted(many) == [0, 1, 2]
    assert all(many[i] == single[0] for i in range(3))
    assert engine.scheduler.num_prefix_queried_tokens - queried == len(prompt_ids), "the prompt was admitted once"
    assert many_peak < 3 * single_peak
    assert bm.num_free_blocks == bm.num_blocks - 1


def test_seeded_n_repeats_and_its_sequences_differ(make_engine, prompt_ids):
    engine = make_engine(**CONFIG)
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    first, _ = run(engine, prompt_ids, params, "a")
    again, _ = run(engine, prompt_ids, params, "b")
    assert first == again
    assert len({tuple(t) for t in first.values()}) == 3
    other, _ = run(engine, prompt_ids, params.model_copy(update={"seed": 99}), "c")
    assert other != first


def test_sequences_finish_on_their_own(make_engine, prompt_ids):
    """Sampled with a stop token: some sequences stop early, the others run to max_tokens."""
    engine = make_engine(**CONFIG)
    newline = engine.tokenizer("\n")["input_ids"][0]
    params = SamplingParams(n=6, max_tokens=8, temperature=1.0, seed=7, stop_token_ids=[newline], ignore_eos=True)
    outs, _ = run(engine, prompt_ids, params, "stops")
    lengths = sorted(len(t) for t in outs.values())
    assert len(outs) == 6 and lengths[0] < 8 and lengths[-1] == 8, lengths


def test_abort_frees_every_sequence(make_engine, prompt_ids):
    engine = make_engine(**CONFIG)
    bm = engine.block_manager.bm
    engine.add_request(prompt_ids, SamplingParams(n=4, max_tokens=50, ignore_eos=True), request_id="gone")
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 4
    engine.abort("gone")
    assert not engine.has_unfinished() and not engine.requests and not engine.has_request("gone")
    assert bm.num_free_blocks == bm.num_blocks - 1
    bm.check_invariants()


def test_abort_before_the_fork_frees_the_pending_sequences(make_engine, prompt_ids):
    engine = make_engine(**CONFIG)
    engine.add_request(prompt_ids, SamplingParams(n=3, max_tokens=5), request_id="early")
    engine.abort("early")
    assert not engine.has_unfinished() and not engine.requests


def test_ngram_speculation_per_sequence_stays_lossless(make_engine, prompt_ids):
    engine = make_engine(**CONFIG, speculator="ngram")
    plain = make_engine(**CONFIG)
    greedy = dict(max_tokens=24, ignore_eos=True)
    expected, _ = run(plain, prompt_ids, SamplingParams(**greedy), "plain")
    drafted = engine.spec.drafted
    outs, _ = run(engine, prompt_ids, SamplingParams(n=3, **greedy), "spec")
    assert engine.spec.drafted > drafted
    assert all(outs[i] == expected[0] for i in range(3))


def test_cumulative_logprob_sums_the_targets_logprobs_of_the_sampled_tokens(make_engine, hf_model, prompt_ids):
    engine = make_engine(**CONFIG)
    params = SamplingParams(n=2, max_tokens=5, temperature=1.0, seed=3, ignore_eos=True)
    engine.add_request(prompt_ids, params, request_id="lp")
    final = {o.index: o for o in engine.run() if o.finished}
    assert sorted(final) == [0, 1]
    for out in final.values():
        ids = prompt_ids + out.output_token_ids
        with torch.inference_mode():
            logprobs = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1)
        rows = range(len(prompt_ids) - 1, len(ids) - 1)
        expected = sum(float(logprobs[r, ids[r + 1]]) for r in rows)
        assert out.cumulative_logprob == pytest.approx(expected, abs=1e-2)


def test_n_is_bounded():
    with pytest.raises(ValueError, match="n"):
        SamplingParams(n=17)


def test_async_stream_carries_every_sequence_and_leaving_it_frees_them_all(make_engine, prompt_ids):
    from engine.async_engine import AsyncEngine

    engine = make_engine(**CONFIG)
    bm = engine.block_manager.bm
    aeng = AsyncEngine(engine)
    try:

        async def whole() -> dict[int, list[int]]:
            tokens: dict[int, list[int]] = {}
            async for out in aeng.generate(prompt_ids, SamplingParams(n=3, max_tokens=4, ignore_eos=True)):
                tokens.setdefault(out.index, []).extend(out.new_token_ids)
            return tokens

        async def leave_early() -> None:
            async for out in aeng.generate(prompt_ids, SamplingParams(n=3, max_tokens=200, ignore_eos=True)):
                if out.index == 2:
                    break

        tokens = asyncio.run(whole())
        assert sorted(tokens) == [0, 1, 2] and all(len(t) == 4 for t in tokens.values())
        asyncio.run(leave_early())
        deadline = time.monotonic() + 30
        while (engine.has_unfinished() or bm.num_free_blocks != bm.num_blocks - 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.requests and bm.num_free_blocks == bm.num_blocks - 1
    finally:
        aeng.shutdown()
