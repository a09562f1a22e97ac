"""Logprobs in the engine on the default model: the raw log-softmax of the row that produced each token, equal with
speculation on (n-gram chains and trees, verified in one forward) to plain decoding, equal to HF's logits, the
top tokens sorted; prompt logprobs scored over chunked prefills and never skipped by a prefix-cache hit."""

from __future__ import annotations

import pytest
import torch

from sampling.logprobs import TokenLogprob, token_logprobs
from sampling.params import SamplingParams

TOL = 1e-4
BASE = {"kv_cache_gib": 0.25, "max_model_len": 512}
# repeats itself, so n-gram drafts land
PROMPT = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\ndef fib2(n):\n"
PARAMS = SamplingParams(max_tokens=20, ignore_eos=True, logprobs=5, prompt_logprobs=3)


def run(engine, prompt=PROMPT, params=PARAMS) -> tuple[list[int], list[TokenLogprob], list[TokenLogprob] | None]:
    """Output tokens, their logprobs (gathered over the request's outputs), and the prompt logprobs."""
    engine.add_request(prompt, params)
    tokens, logprobs, prompt_logprobs, firsts = [], [], None, 0
    for out in engine.run():
        assert out.logprobs is not None and len(out.logprobs) == len(out.new_token_ids)
        tokens += out.new_token_ids
        logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            prompt_logprobs, firsts = out.prompt_logprobs, firsts + 1
    assert firsts == 1, "the prompt logprobs come once, with the first output"
    assert [lp.token_id for lp in logprobs] == tokens
    return tokens, logprobs, prompt_logprobs


def assert_close(a: list[TokenLogprob], b: list[TokenLogprob]) -> None:
    assert [x.token_id for x in a] == [y.token_id for y in b]
    for x, y in zip(a, b):
        assert abs(x.logprob - y.logprob) <= TOL
        assert len(x.top) == len(y.top)
        for (tx, vx), (ty, vy) in zip(x.top, y.top):
            assert abs(vx - vy) <= TOL and (tx == ty or abs(vx - vy) <= TOL)  # ties may swap


@pytest.fixture(scope="module")
def plain(make_engine):
    return run(make_engine(**BASE))


def test_values_are_the_models_log_softmax_top_sorted(make_engine, hf_model, tokenizer, plain):
    tokens, logprobs, prompt_logprobs = plain
    ids = tokenizer(PROMPT)["input_ids"]
    assert len(prompt_logprobs) == len(ids) - 1 and [lp.token_id for lp in prompt_logprobs] == ids[1:]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids + tokens])).logits[0].float(), dim=-1)
    scored = prompt_logprobs + logprobs  # row p scores token p + 1
    for p in (0, 5, len(ids) - 2, len(ids) - 1, len(ids) + 7):
        lp = scored[p]
        assert abs(lp.logprob - float(ref[p, lp.token_id])) <= TOL
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and len(lp.top) == (3 if p < len(ids) - 1 else 5)
        top = torch.topk(ref[p], len(lp.top))
        assert torch.allclose(torch.tensor(values), top.values, atol=TOL)
        for t, v in lp.top:
            assert abs(v - float(ref[p, t])) <= TOL


def test_chosen_token_is_reported_outside_the_top_and_at_zero(make_engine):
    engine = make_engine(**BASE)
    params = SamplingParams(max_tokens=6, temperature=1.5, seed=7, logprobs=0, logit_bias={42: 100})
    engine.add_request("Once upon a time", params)
    outs = [o for o in engine.run()]
    got = [lp for o in outs for lp in o.logprobs]
    assert [lp.token_id for lp in got] == [42] * 6  # the bias picked a token the raw model finds unlikely
    assert all(lp.top == () for lp in got) and got[0].logprob < -5.0, got[0]


def test_prefix_cache_hit_still_scores_the_whole_prompt(make_engine, plain):
    engine = make_engine(**BASE)
    engine.generate([PROMPT], SamplingParams(max_tokens=2))  # its blocks are now in the prefix cache
    hits = engine.scheduler.num_prefix_hit_tokens
    _, _, prompt_logprobs = run(engine)
    assert engine.scheduler.num_prefix_hit_tokens == hits, "the prompt logprobs request used cached KV"
    assert_close(prompt_logprobs, plain[2])
    engine.generate([PROMPT], SamplingParams(max_tokens=2))
    assert engine.scheduler.num_prefix_hit_tokens > hits, "other requests still hit the cache"


def test_nothing_is_computed_for_requests_that_do_not_ask(make_engine):
    out = make_engine(**BASE).generate([PROMPT], SamplingParams(max_tokens=4))[0]
    assert out.logprobs is None and out.prompt_logprobs is None


def test_token_logprobs_k_and_rows():
    logits = torch.tensor([[0.0, 1.0, 2.0], [5.0, 5.0, -float("inf")]])
    out = token_logprobs(logits, [0, 2], 2)
    assert out[0].token_id == 0 and abs(out[0].logprob - float(torch.log_softmax(logits[0], -1)[0])) < 1e-6
    assert [t for t, _ in out[0].top] == [2, 1]
    assert out[1].logprob == -float("inf") and {t for t, _ in out[1].top} == {0, 1}
    assert token_logprobs(logits, [], 3) == [] and token_logprobs(logits, [1], 0)[0].top == ()


@pytest.mark.parametrize("candidates", [1, 3])
def test_speculation_reports_the_logprobs_of_plain_decoding(make_engine, plain, candidates):
    """n-gram chains (over a chunked prefill) and token trees: the verification rows give plain decoding's values."""
    engine = make_engine(
        **BASE, speculator="ngram", num_speculative_tokens=4, num_candidates=candidates, max_num_batched_tokens=16
    )
    before = engine.spec.accepted
    tokens, logprobs, prompt_logprobs = run(engine)
    assert engine.spec.accepted > before, "no draft was accepted: the test checks nothing"
    assert tokens == plain[0]
    assert_close(logprobs, plain[1])
    assert_close(prompt_logprobs, plain[2])


@pytest.fixture(scope="module")
def mlp_model(mlp_drafter) -> dict:
    return {"speculator": "mlp", "speculator_model": str(mlp_drafter), "k_policy": "backoff"}  # drafts every step


@pytest.mark.parametrize("speculator", ["suffix", "draft", "mlp"])
def test_every_speculator_reports_the_logprobs_of_plain_decoding(make_engine, plain, speculator, request):
    """The suffix tree, the layer-truncated draft model and the MLP speculator: accepted or rejected, each
    emitted token's logprobs are those of plain decoding."""
    config = request.getfixturevalue("mlp_model") if speculator == "mlp" else {"speculator": speculator}
    if speculator == "draft":
        config["draft_num_layers"] = 8
    engine = make_engine(**BASE, num_speculative_tokens=3, **config)
    drafted = engine.spec.drafted
    tokens, logprobs, prompt_logprobs = run(engine)
    assert engine.spec.drafted > drafted, "nothing was drafted: the test checks nothing"
    assert tokens == plain[0]
    assert_close(logprobs, plain[1])
    assert_close(prompt_logprobs, plain[2])
