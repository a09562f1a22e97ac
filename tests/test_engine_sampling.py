"""Speculative sampling through the whole engine: target distribution kept, seeded runs repeat."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from scipy.stats import chisquare

from sampling.params import MIN_TEMPERATURE, SEED_MAX, SEED_MIN, SamplingParams
from sampling.sampler import make_generator, processed_probs

# False-alarm rate of the distribution test: the chi-square p-value must fall below ALPHA to fail.
ALPHA = 1e-3
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name one fruit."}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def target_probs(hf_model, ids: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        logits = torch.stack([hf_model(torch.tensor([x])).logits[0, -1] for x in ids])
    return torch.softmax(logits.double() / TEMPERATURE, dim=-1)


def assert_two_token_law(
    outs, p1: torch.Tensor, second_law: Callable[[list[int]], torch.Tensor], min_cells: int, what: str
) -> None:
    """χ² test of the joint law of the first two output tokens of `outs` (one prompt, many seeds) against the
    first token's law `p1` and `second_law(firsts)`, each first token's law of the second, stacked. Cells of the
    12 x 12 most probable pairs with an expected count of 5 or more; the rest is pooled in one cell."""
    n = len(outs)
    pairs = Counter(tuple(o.output_token_ids[:2]) for o in outs)
    firsts = torch.topk(p1, 12).indices.tolist()
    p2 = second_law(firsts)
    expected, observed = [], []
    for i, t1 in enumerate(firsts):
        for t2 in torch.topk(p2[i], 12).indices.tolist():
            e = float(p1[t1] * p2[i, t2]) * n
            if e >= 5:
                expected.append(e)
                observed.append(pairs.get((t1, t2), 0))
    assert len(expected) >= min_cells, "distribution too far from uniform or point mass for a useful test"
    expected.append(n - sum(expected))
    observed.append(n - sum(observed))
    stat, p_value = chisquare(observed, expected)
    assert p_value > ALPHA, f"{what} do not follow the target (chi2={stat:.1f}, p={p_value:.2e})"


def test_speculative_sampling_keeps_the_target_distribution(make_engine, hf_model, prompt_ids):
    """Joint law of the first two tokens; the second comes out of draft verification (rejection sampling)."""
    n = 600
    engine = make_engine(speculator="draft", num_speculative_tokens=2, draft_num_layers=8, max_num_seqs=128)
    params = [SamplingParams(max_tokens=3, temperature=TEMPERATURE, seed=i, ignore_eos=True) for i in range(n)]
    drafted_before = engine.spec.drafted
    outs = engine.generate([prompt_ids] * n, params)
    assert engine.spec.drafted - drafted_before >= n // 2, "too few verification steps saw a draft"
    p1 = target_probs(hf_model, [prompt_ids])[0]
    assert_two_token_law(
        outs, p1, lambda firsts: target_probs(hf_model, [prompt_ids + [t] for t in firsts]), 4, "speculative samples"
    )


@pytest.mark.parametrize("config", [{}, {"speculator": "ngram"}, {"speculator": "draft", "draft_num_layers": 8}])
def test_seeded_requests_repeat_exactly(make_engine, prompt_ids, config):
    engine = make_engine(**config)
    params = [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=s) for s in (1, 2, 3)]
    first = [o.output_token_ids for o in engine.generate([prompt_ids] * 3, params)]
    again = [o.output_token_ids for o in engine.generate([prompt_ids] * 3, params)]
    alone = engine.generate([prompt_ids], [params[1]])[0].output_token_ids
    assert first == again
    assert alone == first[1], "a seeded request must not depend on what shares its batch"
    assert len({tuple(x) for x in first}) > 1, "different seeds gave identical samples"


@pytest.mark.parametrize("seed", [SEED_MIN, -1, 0, SEED_MAX, SEED_MAX + 1])  # SEED_MAX + 1: the draft's seed + 1
def test_make_generator_takes_every_int64_seed_deterministically(seed):
    draws = [torch.rand(4, generator=make_generator(seed)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0], torch.rand(4, generator=make_generator(seed + 2**64)))  # seeds are mod 2^64


def test_seeds_at_both_ends_of_int64_sample_and_repeat(make_engine, prompt_ids):
    engine = make_engine(speculator="draft", draft_num_layers=8)  # the draft model seeds with seed + 1
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=s) for s in (SEED_MIN, -1, SEED_MAX)]
    first = engine.generate([prompt_ids] * 3, params)
    again = engine.generate([prompt_ids] * 3, params)
    assert all(o.finish_reason in ("stop", "length") for o in first)
    assert [o.output_token_ids for o in first] == [o.output_token_ids for o in again]


def test_probabilities_stay_a_distribution_at_extreme_values():
    g = torch.Generator().manual_seed(0)
    logits = 30 * torch.randn(3, 1000, generator=g)
    logits[0, 5], logits[1, :10] = 1e4, -1e30
    top = logits.argmax(-1)
    one_hot = torch.nn.functional.one_hot(top, 1000).float()
    for params in [
        SamplingParams(temperature=1e-320),
        SamplingParams(temperature=1e-40),
        SamplingParams(temperature=0.7, top_p=1e-320),
        SamplingParams(temperature=0.7, top_k=1),
    ]:
        assert torch.equal(processed_probs(logits, params), one_hot), params
    assert SamplingParams(temperature=MIN_TEMPERATURE / 2).greedy and not SamplingParams(temperature=1e-5).greedy
    for params in [
        SamplingParams(temperature=MIN_TEMPERATURE),
        SamplingParams(temperature=100.0, top_p=0.5, top_k=50),
        SamplingParams(temperature=1e-3, top_p=1e-9),
    ]:
        p = processed_probs(logits, params)
        assert torch.isfinite(p).all() and (p >= 0).all(), params
        assert torch.allclose(p.sum(-1), torch.ones(3)) and torch.equal(p.argmax(-1), top), params
    # NaN logits carry no probability, +inf is the largest; a row without a finite logit raises.
    bad = logits.clone()
    bad[0, :500], bad[1, 7] = float("nan"), float("inf")
    p = processed_probs(bad, SamplingParams(temperature=0.8))
    assert torch.isfinite(p).all() and (p[0, :500] == 0).all() and p[1].argmax() == 7
    with pytest.raises(ValueError, match="finite"):
        processed_probs(torch.full((1, 10), float("nan")), SamplingParams(temperature=0.8))
