"""Engine behaviour around requests: validation, streaming, stop conditions, cancellation, prefix reuse."""

from __future__ import annotations

import pytest

from engine.llm_engine import LLMEngine
from engine.tokenization import RequestError
from model.config import EngineConfig
from model.loader import ModelLoadError
from sampling.params import SamplingParams


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 1, "seed": 18446744073709551616}, "seed"),  # OpenAI bounds seeds as int64
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"max_tokens": 4, "nucleus": 0.9}, "nucleus"),
    ],
)
def test_bad_sampling_parameters_give_clear_errors(engine, params, message):
    with pytest.raises(RequestError, match=message):
        engine.add_request("hello", params)
    assert not engine.has_unfinished()


def test_prompt_longer_than_context_is_rejected(engine):
    with pytest.raises(RequestError, match="context"):
        engine.add_request([1] * engine.max_model_len)
    with pytest.raises(RequestError, match="messages"):
        engine.add_request(messages=[])
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request([engine.arch.vocab_size + 5])


def test_unknown_model_path_and_bad_config():
    with pytest.raises(ModelLoadError, match="not found"):
        LLMEngine(model="/nonexistent/model")
    with pytest.raises(ValueError, match="block_sise"):
        LLMEngine(block_sise=16)
    with pytest.raises(ValueError, match="speculator"):
        EngineConfig(speculator="medusa")


def test_streamed_deltas_add_up_and_eos_or_length_finish(engine):
    rid = engine.add_request(messages=[{"role": "user", "content": "Say hello in French."}], params={"max_tokens": 24})
    text, last = "", None
    for out in engine.run():
        assert out.request_id == rid
        text += out.delta
        last = out
    assert last.finished and last.finish_reason in ("stop", "length")
    assert text == last.text and text
    assert len(last.output_token_ids) <= 24
    assert last.metrics.ttft is not None and last.metrics.latency >= last.metrics.ttft
    assert 0 <= last.metrics.queue_time <= last.metrics.ttft


def test_stop_string_truncates_and_max_tokens_caps(engine):
    base = engine.generate(["def add(a, b):\n"], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.output_token_ids) == 30
    stop = base.text[8:12]
    assert stop.strip()
    out = engine.generate(["def add(a, b):\n"], SamplingParams(max_tokens=30, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == base.text[: base.text.index(stop)]
    eos_stop = engine.generate(
        ["def add(a, b):\n"], SamplingParams(max_tokens=30, stop_token_ids=[base.output_token_ids[3]])
    )[0]
    assert eos_stop.output_token_ids == base.output_token_ids[:4] and eos_stop.finish_reason == "stop"


def test_abort_frees_blocks_at_once(engine):
    total_free = engine.block_manager.stats()["num_free_blocks"]
    rid = engine.add_request("Once upon a time", SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.stats()["num_free_blocks"] < total_free
    engine.abort(rid)
    assert engine.block_manager.stats()["num_free_blocks"] == total_free
    assert not engine.has_unfinished()


def test_stats_count_queued_running_and_free_blocks(engine):
    idle = engine.stats()
    assert idle["num_waiting"] == idle["num_running"] == 0
    assert idle["total_kv_blocks"] == engine.num_kv_blocks + 1
    assert idle["free_kv_blocks"] == engine.num_free_kv_blocks()
    a = engine.add_request("Once upon a time", SamplingParams(max_tokens=50, ignore_eos=True))
    b = engine.add_request("In a land far away", SamplingParams(max_tokens=50, ignore_eos=True))
    assert engine.stats()["num_waiting"] == 2
    engine.step()
    busy = engine.stats()
    assert busy["num_waiting"] == 0 and busy["num_running"] == 2
    assert busy["free_kv_blocks"] == engine.num_free_kv_blocks() < idle["free_kv_blocks"]
    engine.abort(a)
    engine.abort(b)
    assert engine.stats()["num_running"] == 0


def test_shared_prefix_is_computed_once(engine):
    system = "You are a careful assistant who answers in one short sentence. " * 6
    msgs = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in ("Hi?", "Why?")]
    engine.generate([msgs[0]], SamplingParams(max_tokens=2))
    hits_before = engine.block_manager.stats()["prefix_cache_hits"]
    before = engine.stats()
    second = engine.generate([msgs[1]], SamplingParams(max_tokens=2))[0]
    assert engine.block_manager.stats()["prefix_cache_hits"] - hits_before >= 4 * engine.config.block_size
    after = engine.stats()  # the same hit, in prompt tokens, as the metrics publish it
    assert after["prefix_queried_tokens"] - before["prefix_queried_tokens"] == len(second.prompt_token_ids)
    assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] >= 4 * engine.config.block_size


def test_kv_waste_under_one_block_per_sequence(engine):
    prompts = [f"Count from {i} to {i + 20}:" for i in range(6)]
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=20, ignore_eos=True))
    worst = 0.0
    while engine.has_unfinished():
        engine.step()
        live = len(engine.requests)
        if live:
            worst = max(worst, engine.kv_waste_slots() / live)
    assert worst < engine.config.block_size
