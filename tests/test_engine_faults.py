"""One request never takes another down: extreme sampling values finish, and a request whose own processing
fails, or that keeps breaking the forward, ends alone with RequestFailed while the others finish with the
tokens they produce alone. Afterwards the engine holds no request and every KV block is free."""

from __future__ import annotations

import asyncio

import pytest

import engine.acceptance as acceptance
from engine.async_engine import AsyncEngine, RequestFailed
from engine.llm_engine import LLMEngine
from engine.recovery import BREAKS_FORWARD, SEQUENCE_FAILED
from sampling.params import SamplingParams

PROMPTS = ["hi", "The three primary colours are", "def add(a, b):\n    return", "Once upon a time,"]
GREEDY = SamplingParams(max_tokens=6)
SEEDED = SamplingParams(max_tokens=6, temperature=0.8, seed=7)
# The values that made NaN probabilities and ended every request in flight.
EXTREME = [
    SamplingParams(max_tokens=4, temperature=1e-320),
    SamplingParams(max_tokens=4, temperature=1e-40),
    SamplingParams(max_tokens=4, temperature=0.7, top_p=1e-320),
]
DRAFT = {"speculator": "draft", "draft_num_layers": 8}


def alone(engine: LLMEngine, prompt, params: SamplingParams) -> list[int]:
    return engine.generate([prompt], params)[0].output_token_ids


def assert_idle(engine: LLMEngine) -> None:
    assert engine.num_requests == 0 and not engine.has_unfinished()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.num_free_kv_blocks() == engine.num_kv_blocks, "KV blocks held after every request ended"


def batch() -> tuple[list[str], list[SamplingParams]]:
    """The extreme requests next to ordinary greedy and seeded ones."""
    prompts = [PROMPTS[0]] * len(EXTREME) + PROMPTS[1:] + PROMPTS[1:]
    params = EXTREME + [GREEDY] * 3 + [SEEDED] * 3
    return prompts, params


@pytest.mark.parametrize("config", [{}, DRAFT], ids=["plain", "draft"])
def test_extreme_sampling_values_finish_and_hurt_no_one(make_engine, config):
    engine = make_engine(**config)
    prompts, params = batch()
    outs = engine.generate(prompts, params)
    assert all(o.finish_reason in ("stop", "length") and o.error is None for o in outs)
    greedy_hi = alone(engine, PROMPTS[0], SamplingParams(max_tokens=4))
    # A temperature under the floor is greedy; top_p below float resolution keeps the top token only.
    assert [o.output_token_ids for o in outs[:3]] == [greedy_hi] * 3
    for o, p, sp in zip(outs[3:], prompts[3:], params[3:]):
        assert o.output_token_ids == alone(engine, p, sp)
    assert_idle(engine)


def test_extreme_sampling_values_through_the_async_engine(make_engine):
    engine = make_engine()
    prompts, params = batch()
    expected = [alone(engine, p, sp) for p, sp in zip(prompts, params)]
    aeng = AsyncEngine(engine)
    try:

        async def one(prompt, sp):
            tokens, last = [], None
            async for out in aeng.generate(prompt, sp):
                tokens.extend(out.new_token_ids)
                last = out
            assert last.finish_reason in ("stop", "length")
            return tokens

        async def main():
            return await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params)))

        assert asyncio.run(main()) == expected
        assert aeng.num_step_errors == 0
    finally:
        aeng.shutdown()
    assert_idle(engine)


def fail_processing_for_seed(monkeypatch, seed: int) -> None:
    """Make computing the probabilities of requests with this seed raise, as a numerical bug would."""
    real = acceptance.processed_probs

    def flaky(logits, params):
        if params.seed == seed:
            raise FloatingPointError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params)

    monkeypatch.setattr(acceptance, "processed_probs", flaky)


def stream_all(aeng: AsyncEngine, prompts: list, params: list[SamplingParams]) -> list:
    """Stream every request at once; each one's tokens, or the exception that ended it."""

    async def one(prompt, sp):
        tokens = []
        async for out in aeng.generate(prompt, sp):
            tokens.extend(out.new_token_ids)
        return tokens

    async def main():
        return await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params)), return_exceptions=True)

    return asyncio.run(main())


def test_a_failure_in_one_sequences_processing_ends_that_request_only(make_engine, monkeypatch):
    engine = make_engine()
    prompts = PROMPTS[1:] * 2
    params = [GREEDY] * 3 + [SEEDED, SamplingParams(max_tokens=6, temperature=0.8, seed=666), SEEDED]
    expected = [alone(engine, p, sp) for p, sp in zip(prompts, params)]
    fail_processing_for_seed(monkeypatch, 666)

    outs = engine.generate(prompts, params)
    assert [o.finish_reason for o in outs] == ["length"] * 4 + ["error", "length"]
    assert outs[4].error == SEQUENCE_FAILED and outs[4].finished
    assert [o.output_token_ids for i, o in enumerate(outs) if i != 4] == expected[:4] + expected[5:]
    assert_idle(engine)

    aeng = AsyncEngine(engine)
    try:
        results = stream_all(aeng, prompts, params)
    finally:
        aeng.shutdown()
    failed = results.pop(4)
    assert isinstance(failed, RequestFailed) and str(failed) == SEQUENCE_FAILED
    assert "\n" not in str(failed) and "FloatingPointError" not in str(failed)
    assert results == expected[:4] + expected[5:]
    assert aeng.num_step_errors == 0 and engine.num_failed_requests == 2
    assert_idle(engine)


def break_the_forward_on(engine: LLMEngine, marker: int) -> list[tuple[int, bool]]:
    """Make every forward that feeds `marker` raise, as a request that trips a kernel bug would. Returns the
    forwards as they come: (sequences fed, whether it failed)."""
    real_execute, forwards = engine.runner.execute, []

    def breaks_on_marker(items):
        fails = any(marker in item.token_ids for item in items)
        forwards.append((len(items), fails))
        if fails:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_execute(items)

    engine.runner.execute = breaks_on_marker
    return forwards


def test_a_request_that_keeps_breaking_the_forward_is_isolated_and_ended_alone(make_engine, tokenizer):
    engine = make_engine()
    marker = tokenizer("zebra")["input_ids"][-1]
    culprit = tokenizer("Tell me about a")["input_ids"] + [marker]
    prompts = [PROMPTS[1], culprit, PROMPTS[2], PROMPTS[3]]
    assert all(marker not in tokenizer(p)["input_ids"] for p in (PROMPTS[1], PROMPTS[2], PROMPTS[3]))
    params = [GREEDY, GREEDY, SEEDED, GREEDY]
    expected = [alone(engine, p, sp) for p, sp in zip(prompts, params)]
    forwards = break_the_forward_on(engine, marker)
    aeng = AsyncEngine(engine)  # no repair hook: nothing to rebuild, so failed steps are recomputed
    try:
        results = stream_all(aeng, prompts, params)
    finally:
        aeng.shutdown()
        del engine.runner.execute
    failed = results.pop(1)
    assert isinstance(failed, RequestFailed) and str(failed) == BREAKS_FORWARD
    assert results == expected[:1] + expected[2:]
    # 3 batched failures (then isolation), 2 solo failures of the culprit (then it is ended).
    assert aeng.num_step_errors == 3 + 2 and not engine.isolating
    # The requests reach the engine one by one from its input thread, so how many were in flight when the
    # isolation began varies; every suspect runs alone, the culprit's last two forwards fail alone.
    failing = [i for i, (_, failed) in enumerate(forwards) if failed]
    assert len(failing) == 3 + 2, forwards
    # from the isolation on until the culprit is ended, the suspects run one at a time
    isolated = forwards[failing[2] + 1 : failing[-1] + 1]
    assert isolated and all(n == 1 for n, _ in isolated), ("the suspects were not run alone", forwards)
    assert_idle(engine)


def test_requests_aborted_while_isolated_free_everything(make_engine, tokenizer):
    engine = make_engine()
    marker = tokenizer("zebra")["input_ids"][-1]
    break_the_forward_on(engine, marker)
    try:
        ids = [engine.add_request(p, GREEDY) for p in PROMPTS[1:]]
        culprit = engine.add_request(tokenizer("Tell me about a")["input_ids"] + [marker], GREEDY)
        failed = 0
        while not engine.isolating:
            with pytest.raises(RuntimeError):
                engine.step()
            assert engine.recover() == []
            failed += 1
        assert failed == 3 and engine.num_requests == 4
        engine.abort(ids[0])  # the suspect under test
        engine.abort(ids[2])  # a suspect waiting its turn
        late = engine.add_request(PROMPTS[0], GREEDY)  # held until the suspects are through
        finished = {}
        while engine.has_unfinished():
            try:
                outs = engine.step()
            except RuntimeError:
                outs = engine.recover()
            finished.update({o.request_id: o for o in outs if o.finished})
        assert set(finished) == {ids[1], culprit, late}
        assert finished[culprit].error == BREAKS_FORWARD and finished[ids[1]].finish_reason == "length"
        assert finished[late].output_token_ids == alone(engine, PROMPTS[0], GREEDY)
    finally:
        del engine.runner.execute
    assert not engine.isolating
    assert_idle(engine)
