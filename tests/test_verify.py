"""Tests for speculator.verify: greedy rules, statistical losslessness, seeded determinism.

Statistical tests use Pearson's chi-square goodness of fit at ALPHA = 1e-4 per check. Under a correct
sampler and a random seed each check would fail with probability 1e-4; the losslessness tests make 11
such checks, so their family-wise false-alarm rate is about 0.1% (Bonferroni). All seeds are fixed, so
in practice the outcome is deterministic. The checks have power: deliberately wrong samplers, scored
the same way on the same trials, fail them with p-values far below ALPHA. TRIALS is 10k per case to
keep the file within ~10 s of CPU time (verify_sampled costs ~0.1 ms a call).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from speculator.verify import sample, verify_greedy, verify_sampled

ALPHA = 1e-4  # per-check false-alarm rate of the chi-square tests
V = 12  # vocabulary size
K = 3  # draft length
TRIALS = 10_000
MIN_POSITION_SAMPLES = 500  # test position j only when this many trials reached it


# ----------------------------------------------------------------------------------------------- greedy


def test_greedy_all_match_gives_bonus() -> None:
    assert verify_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]


def test_greedy_first_mismatch() -> None:
    assert verify_greedy([9, 6, 7, 8], [5, 6, 7]) == [9]


def test_greedy_middle_mismatch() -> None:
    assert verify_greedy([5, 6, 1, 8], [5, 6, 7]) == [5, 6, 1]
    assert verify_greedy([5, 2, 7, 8], [5, 6, 7]) == [5, 2]


def test_greedy_k0() -> None:
    assert verify_greedy([4], []) == [4]


def test_greedy_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        verify_greedy([1, 2], [1, 2])


def test_greedy_is_zero_temperature_limit_of_sampled() -> None:
    """With one-hot target distributions, sampled verification reduces to greedy verification."""
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(0, 5, (1,), generator=rng))
        target = torch.randint(0, 4, (k + 1,), generator=rng).tolist()
        draft = torch.randint(0, 4, (k,), generator=rng).tolist()
        p = torch.nn.functional.one_hot(torch.tensor(target), V).float()
        got = verify_sampled(p, draft, None, torch.Generator().manual_seed(1))
        assert got == verify_greedy(target, draft)


# ------------------------------------------------------------------------------------ statistical helpers


def chisquare_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit of ``tokens`` to ``probs``, merging bins with expected count < 5."""
    observed = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
    assert observed[probs == 0].sum() == 0, "emitted a token the target gives probability 0"
    expected = len(tokens) * probs / probs.sum()
    order = np.argsort(expected)
    obs_bins: list[float] = []
    exp_bins: list[float] = []
    acc_o = acc_e = 0.0
    for i in order:  # ascending expected count: pool small bins until the pool reaches 5
        if expected[i] == 0:
            continue
        acc_o += observed[i]
        acc_e += expected[i]
        if acc_e >= 5:
            obs_bins.append(acc_o)
            exp_bins.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0 and obs_bins:  # leftover pool below 5: fold it into the last (largest) bin
        obs_bins[-1] += acc_o
        exp_bins[-1] += acc_e
    assert len(obs_bins) >= 2, "too few bins for a chi-square test"
    return float(chisquare(obs_bins, exp_bins).pvalue)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)


def _target(seed: int, top_k: int | None = None) -> torch.Tensor:
    """Fixed target distributions p [K+1, V], optionally top-k truncated (zeros elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(K + 1, V, generator=g)
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return _softmax(logits)


def _cases() -> dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """name -> (p [K+1, V], q [K, V] given to the verifier or None, distribution the drafts come from)."""
    p = _target(seed=1)
    g = torch.Generator().manual_seed(2)
    good = 0.9 * p[:K] + 0.1 * _softmax(torch.randn(K, V, generator=g))
    bad = p[:K].pow(-3.0)  # peaked on the target's least likely tokens
    bad = bad / bad.sum(-1, keepdim=True)
    zero = p[:K].clone()  # zero mass on each position's 3 most likely target tokens
    zero.scatter_(1, p[:K].topk(3, dim=-1).indices, 0.0)
    zero = zero / zero.sum(-1, keepdim=True)
    p_topk = _target(seed=3, top_k=6)
    hidden_rule = 0.6 * p_topk[:K] + 0.4 / V  # full support: proposes p = 0 tokens ~20% of the time
    return {
        "good_draft": (p, good, good),
        "bad_draft": (p, bad, bad),
        "q_zero_on_needed_tokens": (p, zero, zero),
        # Deterministic drafter (n-gram style) whose tokens come from a rule the verifier never sees;
        # the target is top-k truncated, so the drafter often proposes tokens with p = 0.
        "point_mass": (p_topk, None, hidden_rule),
    }


CASES = _cases()


def _drafts(draw_from: torch.Tensor, seed: int) -> torch.Tensor:
    """[TRIALS, K] draft tokens, position j drawn independently from draw_from[j]."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.multinomial(draw_from[j], TRIALS, True, generator=g) for j in range(K)], 1)


@functools.cache
def _run(case: str) -> tuple[np.ndarray, np.ndarray]:
    """Run TRIALS verifications; returns (drafts [TRIALS, K], emitted tokens padded with -1 [TRIALS, K+1])."""
    p, q, draw_from = CASES[case]
    drafts = _drafts(draw_from, seed=10)
    gen = torch.Generator().manual_seed(11)
    out = np.full((TRIALS, K + 1), -1, dtype=np.int64)
    for t, draft in enumerate(drafts.tolist()):
        emitted = verify_sampled(p, draft, q, gen)
        out[t, : len(emitted)] = emitted
    return drafts.numpy(), out


# -------------------------------------------------------------------------------------- losslessness


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_is_lossless(case: str) -> None:
    """Token j (given tokens 0..j-1 were accepted drafts) is distributed as p[j]; j = 0 is unconditional."""
    p = CASES[case][0].double().numpy()
    drafts, out = _run(case)
    lengths = (out >= 0).sum(1)
    assert lengths.min() >= 1 and lengths.max() <= K + 1
    for j in range(K):  # accepted tokens are the draft's
        reached = lengths > j + 1
        assert (out[reached, j] == drafts[reached, j]).all()
    checked = 0
    for j in range(K + 1):
        tokens = out[lengths > j, j]
        if len(tokens) < MIN_POSITION_SAMPLES:
            break
        pval = chisquare_pvalue(tokens, p[j])
        assert pval > ALPHA, f"{case}: position {j} not distributed as p[{j}] (p-value {pval:.2e})"
        checked += 1
    assert checked >= 2, f"{case}: only {checked} positions had enough samples"


def test_acceptance_rates() -> None:
    """First-position acceptance matches theory (5 sigma: false alarm ~6e-7); good drafts accept often.

    Theory: sum_x min(p(x), q(x)) for a stochastic draft, sum_x w(x) p(x) for a point-mass draft whose
    tokens follow the hidden rule w.
    """
    rates = {}
    for case, (p, q, draw_from) in CASES.items():
        _, out = _run(case)
        rate = float(((out >= 0).sum(1) >= 2).mean())
        expected = float(torch.minimum(p[0], q[0]).sum() if q is not None else (draw_from[0] * p[0]).sum())
        sigma = (expected * (1 - expected) / TRIALS) ** 0.5
        assert abs(rate - expected) < 5 * sigma + 1e-9, (case, rate, expected)
        rates[case] = rate
    assert rates["good_draft"] > 0.8, rates
    assert rates["bad_draft"] < 0.2, rates


def test_point_mass_never_accepts_zero_probability_token() -> None:
    p, _, _ = CASES["point_mass"]
    drafts, out = _run("point_mass")
    zero_prob_token = (p[0] == 0).numpy()
    proposed_zero = zero_prob_token[drafts[:, 0]]
    assert proposed_zero.sum() > 1000  # the case exercises it
    assert (out[proposed_zero, 1] == -1).all()  # always rejected at position 0
    assert not zero_prob_token[out[:, 0]].any()


# -------------------------------------------------------------------- power: wrong samplers must fail


def _first_token_pvalue_of_wrong_sampler(case: str, resample_from_p: bool) -> float:
    """Chi-square p-value of the first token emitted by a buggy sampler, on the same trials as above.

    resample_from_p=False: always accept the draft (no rejection at all).
    resample_from_p=True: correct acceptance test, but on rejection sample p instead of the residual.
    """
    p, q, draw_from = CASES[case]
    assert q is not None
    x = _drafts(draw_from, seed=10)[:, 0]
    if not resample_from_p:
        first = x
    else:
        g = torch.Generator().manual_seed(11)
        accept = torch.rand(TRIALS, generator=g, dtype=torch.float64) < (p[0, x] / q[0, x]).double()
        first = torch.where(accept, x, torch.multinomial(p[0], TRIALS, True, generator=g))
    return chisquare_pvalue(first.numpy(), p[0].double().numpy())


def test_always_accept_sampler_fails_chisquare() -> None:
    assert _first_token_pvalue_of_wrong_sampler("bad_draft", resample_from_p=False) < ALPHA


def test_resample_from_target_sampler_fails_chisquare() -> None:
    assert _first_token_pvalue_of_wrong_sampler("q_zero_on_needed_tokens", resample_from_p=True) < ALPHA


# ------------------------------------------------------------------------------------ edge cases


def test_sampled_k0_samples_target() -> None:
    p = torch.zeros(1, V)
    p[0, 7] = 1.0
    assert verify_sampled(p, [], None, torch.Generator().manual_seed(0)) == [7]
    p = torch.zeros(1, V)
    p[0, 4] = 1.0
    assert verify_sampled(p, [], torch.zeros(0, V), None) == [4]


def test_degenerate_zero_residual_falls_back_to_p() -> None:
    """p slightly below q everywhere (float error): rejections happen but the residual is all zero."""
    q = torch.zeros(1, V)
    q[0, 2] = q[0, 5] = 0.5
    p = torch.cat([0.999 * q, torch.full((1, V), 1.0 / V)])
    seen = set()
    for seed in range(2000):
        out = verify_sampled(p, [2], q, torch.Generator().manual_seed(seed))
        if len(out) == 1:
            seen.add(out[0])
    assert seen and seen <= {2, 5}
    # Point mass: p[0] is all on the draft token but sums to < 1.
    p = torch.zeros(2, V)
    p[0, 3] = 0.5
    p[1, 1] = 1.0
    outs = {tuple(verify_sampled(p, [3], None, torch.Generator().manual_seed(s))) for s in range(50)}
    assert outs == {(3,), (3, 1)}


def test_shape_validation() -> None:
    with pytest.raises(ValueError):
        verify_sampled(torch.full((2, V), 1.0 / V), [1, 2], None, None)
    with pytest.raises(ValueError):
        verify_sampled(torch.full((3, V), 1.0 / V), [1, 2], torch.full((3, V), 1.0 / V), None)


def test_sample_helper() -> None:
    p = torch.zeros(V)
    p[9] = 1.0
    assert sample(p, torch.Generator().manual_seed(0)) == 9
    assert isinstance(sample(torch.full((V,), 1.0 / V), None), int)


# ---------------------------------------------------------------------------------------- determinism


def _seeded_run(seed: int, case: str) -> list[list[int]]:
    p, q, draw_from = CASES[case]
    drafts = _drafts(draw_from, seed=99)[:300].tolist()
    gen = torch.Generator().manual_seed(seed)
    return [verify_sampled(p, d, q, gen) for d in drafts]


@pytest.mark.parametrize("case", ["good_draft", "point_mass"])
def test_seeded_runs_repeat(case: str) -> None:
    assert _seeded_run(123, case) == _seeded_run(123, case)
    assert _seeded_run(123, case) != _seeded_run(124, case)


# ------------------------------------------------------------------------------------ unclean inputs


def test_entries_that_are_not_probabilities_are_never_emitted() -> None:
    """NaN, infinite and negative entries of p carry no mass; a row with no mass at all raises."""
    p = _target(seed=5).clone()
    p[:, :3] = torch.tensor([float("nan"), float("inf"), -0.5])
    gen = torch.Generator().manual_seed(0)
    for draft in ([0, 1, 2], [4, 5, 6], [1, 4, 4]):
        for _ in range(200):
            out = verify_sampled(p, draft, None, gen)
            assert all(t >= 3 for t in out), out
    with pytest.raises(ValueError, match="no probability mass"):
        verify_sampled(torch.full((1, V), float("nan")), [], None, gen)
    with pytest.raises(ValueError, match="no probability mass"):
        sample(torch.zeros(V), gen)
    huge = torch.zeros(V)
    huge[[2, 7]] = torch.finfo(torch.float32).max  # finite entries whose sum overflows
    assert {sample(huge, gen) for _ in range(50)} == {2, 7}


@pytest.mark.parametrize("broken", ["nan_row", "zero_row", "q_of_token_zero"])
def test_a_draft_distribution_that_cannot_explain_its_token_ends_the_draft_there(broken: str) -> None:
    """Position 1's q is unusable: the draft is cut there and position 1's token is drawn from p[1] itself,
    so the output stays distributed as the target (checked at position 1)."""
    p, q, draw_from = CASES["good_draft"]
    q = q.clone()
    q[1] = float("nan") if broken == "nan_row" else 0.0
    gen = torch.Generator().manual_seed(13)
    second = []
    for draft in _drafts(draw_from, seed=12)[:3000].tolist():
        if broken == "q_of_token_zero":
            q[1] = draw_from[1]
            q[1, draft[1]] = 0.0
        out = verify_sampled(p, draft, q, gen)
        assert len(out) <= 2
        if len(out) == 2:
            second.append(out[1])
    assert len(second) >= MIN_POSITION_SAMPLES
    assert chisquare_pvalue(np.array(second), p[1].double().numpy()) > ALPHA
    # Infinite or negative entries elsewhere in q only lose their mass: the same as zeros there, draw for draw.
    q = draw_from[:K].clone()
    q[:, 0], q[:, 1] = float("inf"), -1.0
    zeroed = draw_from[:K].clone()
    zeroed[:, 0] = zeroed[:, 1] = 0.0
    dirty_gen, clean_gen = torch.Generator().manual_seed(15), torch.Generator().manual_seed(15)
    for draft in _drafts(draw_from, seed=14)[:200].tolist():
        out = verify_sampled(p, draft, q, dirty_gen)
        assert 1 <= len(out) <= K + 1
        assert out == verify_sampled(p, draft, zeroed, clean_gen)
