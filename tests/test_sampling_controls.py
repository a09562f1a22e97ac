"""Logits controls (min_tokens, logit_bias, presence / frequency / repetition penalties): their rules, draft rows,
the engine's vocabulary checks, and the engine's output with them on, with and without speculation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine.tokenization import ModelLimits, RequestError, prepare_request
from sampling.controls import LogitsControls
from sampling.params import SamplingParams
from tests.test_engine_sampling import TEMPERATURE, assert_two_token_law

# A negative frequency penalty and a repetition penalty below 1 favour repeats, which n-gram drafts then guess:
# the drafted tokens' counts decide acceptance.
CONTROLS = {"presence_penalty": 0.5, "frequency_penalty": -0.4, "repetition_penalty": 0.9}


def controls(num_prompt: int = 3, eos=(9,), **params) -> LogitsControls:
    out = LogitsControls.for_request(SamplingParams(**params), num_prompt, eos)
    assert out is not None
    return out


def test_no_controls_means_no_processing():
    assert LogitsControls.for_request(SamplingParams(temperature=1.0, stop_token_ids=[3]), 5, {2}) is None


def test_each_rule_as_vllm_applies_it():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0, 3.0, 0.0, 1.0, 1.0, 4.0]])
    prompt, output = [0, 1], [2, 2, 3]
    c = controls(2, (9,), repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    x = c.apply(logits, prompt + output)[0]
    # seen in prompt or output: positive logits halved, negative doubled; output counts: 2 twice, 3 once
    assert x[0] == 1.0 and x[1] == -4.0
    assert x[2] == pytest.approx(0.5 - 2 * 0.5 - 0.25) and x[3] == pytest.approx(0.25 - 0.5 - 0.25)
    assert torch.equal(x[4:], logits[0, 4:])  # unseen tokens untouched
    x = controls(2, (9,), logit_bias={4: -100.0, 5: 7.5}).apply(logits, prompt + output)[0]
    assert x[4] == -101.0 and x[5] == 10.5 and torch.equal(x[:4], logits[0, :4])
    # min_tokens masks EOS and stop_token_ids while the output is shorter; ignore_eos keeps EOS out of it
    x = controls(2, (9,), min_tokens=4, stop_token_ids=[8], max_tokens=8).apply(logits, prompt + output)[0]
    assert x[8] == x[9] == float("-inf") and torch.equal(x[:8], logits[0, :8])
    x = controls(2, (9,), min_tokens=4, stop_token_ids=[8], ignore_eos=True).apply(logits, prompt + output)[0]
    assert x[8] == float("-inf") and x[9] == 4.0
    assert torch.equal(controls(2, (9,), min_tokens=3).apply(logits, prompt + output), logits)  # already 3 out


def test_draft_rows_equal_one_token_at_a_time():
    """Row i counts draft tokens 0..i-1 as output: the same as scoring each position after appending them."""
    g = torch.Generator().manual_seed(0)
    vocab, prompt, output, draft = 50, [1, 2, 3, 4], [5, 5, 6], [6, 7, 9, 5]
    logits = 3 * torch.randn(len(draft) + 1, vocab, generator=g)
    c = controls(4, (9,), min_tokens=6, logit_bias={7: 2.0, 11: -3.0}, max_tokens=16, **CONTROLS)
    rows = c.apply(logits, prompt + output, draft)
    for i in range(len(draft) + 1):
        one = c.apply(logits[i : i + 1], prompt + output + draft[:i])
        torch.testing.assert_close(rows[i : i + 1], one, rtol=0, atol=1e-6)
    assert rows[2, 9] == float("-inf") and rows[3, 9] > float("-inf")  # output tokens 5 and 6: min_tokens=6
    with pytest.raises(ValueError, match="draft"):
        c.apply(logits, prompt + output, draft[:2])


@pytest.mark.parametrize(
    "params, match",
    [
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logit_bias": {3: 100.5}}, "logit_bias"),
        ({"logit_bias": {-3: 1.0}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
    ],
)
def test_bad_controls_are_refused_naming_the_field(tokenizer, params, match):
    limits = ModelLimits(vocab_size=1000, max_model_len=64, block_size=16, num_kv_blocks=8)
    with pytest.raises(RequestError, match=match) as info:
        prepare_request(tokenizer, limits, "hi", params)
    assert info.value.param == match


@pytest.mark.parametrize("field, value", [("logit_bias", {1000: 5.0}), ("stop_token_ids", [3, 1000])])
def test_token_ids_outside_the_vocabulary_are_refused(tokenizer, field, value):
    limits = ModelLimits(vocab_size=1000, max_model_len=64, block_size=16, num_kv_blocks=8)
    with pytest.raises(RequestError, match=f"{field}: token id 1000 is outside") as info:
        prepare_request(tokenizer, limits, "hi", {field: value})
    assert info.value.param == field


def test_min_tokens_must_fit_the_context_left(tokenizer):
    limits = ModelLimits(vocab_size=100_000, max_model_len=64, block_size=16, num_kv_blocks=8)
    fits = prepare_request(tokenizer, limits, "hi", {"min_tokens": 20}, fit_context=True)
    assert fits.params.max_tokens == 64 - len(fits.prompt_token_ids) and fits.params.min_tokens == 20
    with pytest.raises(RequestError, match="min_tokens"):
        prepare_request(tokenizer, limits, "hi", {"min_tokens": 64}, fit_context=True)


# ---- the engine, with the default model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def code_prompts() -> list[str]:
    from tests.conftest import humaneval_prompts

    return humaneval_prompts(2)


def test_bias_minus_100_bans_a_token_and_plus_100_forces_one(make_engine):
    engine = make_engine()
    prompt = ["def add(a, b):\n"]
    free = engine.generate(prompt, SamplingParams(max_tokens=8))[0].output_token_ids
    banned = Counter(free).most_common(1)[0][0]
    for params in [
        SamplingParams(max_tokens=8, ignore_eos=True, logit_bias={banned: -100.0}),
        *(
            SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=s, logit_bias={banned: -100.0})
            for s in range(3)
        ),
    ]:
        out = engine.generate(prompt, params)[0].output_token_ids
        assert banned not in out and len(out) == 8, params
    forced = free[0] + 1
    for params in [
        SamplingParams(max_tokens=6, logit_bias={forced: 100.0}),
        SamplingParams(max_tokens=6, temperature=1.0, seed=0, logit_bias={forced: 100.0}),
    ]:
        assert engine.generate(prompt, params)[0].output_token_ids == [forced] * 6


def test_min_tokens_holds_eos_off(make_engine):
    engine = make_engine()
    messages = [{"role": "user", "content": "Reply with one word: yes or no?"}]
    free = engine.generate([messages], SamplingParams(max_tokens=40))[0]
    assert free.finish_reason == "stop" and len(free.output_token_ids) < 20, "the reference must end early"
    n = len(free.output_token_ids) + 6
    held = engine.generate([messages], SamplingParams(max_tokens=40, min_tokens=n))[0]
    assert len(held.output_token_ids) >= n
    assert not set(held.output_token_ids[:n]) & engine.eos_token_ids


@pytest.mark.parametrize("speculator", [{"speculator": "ngram"}, {"speculator": "draft", "draft_num_layers": 8}])
def test_greedy_with_controls_equals_plain_decoding_under_speculation(make_engine, code_prompts, speculator):
    """Row by row: the argmax after the controls, with the drafted tokens counted, as plain decoding takes it."""
    params = SamplingParams(max_tokens=24, min_tokens=20, logit_bias={198: -2.0, 262: 1.5}, **CONTROLS)
    plain = [o.output_token_ids for o in make_engine().generate(code_prompts, params)]
    engine = make_engine(num_speculative_tokens=4, **speculator)
    before = engine.spec.accepted if speculator["speculator"] == "ngram" else engine.spec.drafted
    spec = [o.output_token_ids for o in engine.generate(code_prompts, params)]
    assert spec == plain
    # n-gram drafts land here (rows past the first are verified); the truncated draft model's mostly miss
    after = engine.spec.accepted if speculator["speculator"] == "ngram" else engine.spec.drafted
    assert after > before, "speculation was not exercised"
    unpenalized = make_engine().generate(code_prompts[:1], SamplingParams(max_tokens=24))[0].output_token_ids
    assert unpenalized != plain[0], "the controls changed nothing"


def target_probs(hf_model, context: list[int], c: LogitsControls | None) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf_model(torch.tensor([context])).logits[0, -1:]
    return torch.softmax((logits if c is None else c.apply(logits, context)).double() / TEMPERATURE, dim=-1)[0]


@pytest.mark.slow
def test_sampling_with_controls_keeps_the_target_distribution_under_draft_speculation(make_engine, hf_model, tokenizer):
    """Joint law of the first two tokens under strong penalties and a bias; the second token comes out of
    rejection sampling against the processed target distribution, with the first token counted."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name one fruit."}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = 600
    engine = make_engine(speculator="draft", num_speculative_tokens=2, draft_num_layers=8, max_num_seqs=128)
    free = target_probs(hf_model, prompt, None)
    top = torch.topk(free, 2).indices.tolist()
    extra = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.5}
    ctrl = {"logit_bias": {top[0]: -1.5, top[1]: 0.7}, **extra}
    params = [SamplingParams(max_tokens=3, temperature=TEMPERATURE, seed=i, ignore_eos=True, **ctrl) for i in range(n)]
    drafted = engine.spec.drafted
    outs = engine.generate([prompt] * n, params)
    assert engine.spec.drafted - drafted >= n // 2, "too few verification steps saw a draft"
    c = controls(len(prompt), (), **ctrl)
    p1 = target_probs(hf_model, prompt, c)
    second = lambda firsts: torch.stack([target_probs(hf_model, prompt + [t], c) for t in firsts])  # noqa: E731
    assert_two_token_law(outs, p1, second, 4, "samples under controls")
