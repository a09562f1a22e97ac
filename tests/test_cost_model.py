"""The speculation cost model: k = 0 when drafts never land, k > 0 when they always do (at batch 1 and at a
large batch), turned down under load when the whole step's rate counts; acceptance tracking by position; and the
start-up measurement of the default model's step time."""

from __future__ import annotations

import pytest

from model.config import EngineConfig
from model.runner import ModelRunner
from sampling.params import SamplingParams
from speculator.cost_model import (
    CostModel,
    SeqAcceptance,
    StepTimes,
    expected_tokens,
    measure_draft_cost,
    measure_step_times,
)
from speculator.proposer import DraftRequest
from speculator.suffix import SuffixProposer

# Flat (memory-bound) up to 16 rows, then linear in rows: a CPU-like target step, in seconds.
KNEE = StepTimes((1, 16, 64, 256, 1024), (0.030, 0.032, 0.120, 0.480, 1.920))
FLAT = StepTimes((1,), (0.030,))
LARGE_BATCH = 255  # rows of the rest of the step


def never() -> SeqAcceptance:
    seq = SeqAcceptance(prior=0.5)
    for _ in range(60):
        seq.update(drafted=4, accepted=0)
    return seq


def always() -> SeqAcceptance:
    seq = SeqAcceptance(prior=0.5)
    for _ in range(60):
        seq.update(drafted=8, accepted=8)
    return seq


def test_step_times_interpolate_and_extrapolate():
    assert KNEE.at(1) == KNEE.at(0) == 0.030
    assert KNEE.at(40) == pytest.approx(0.032 + 24 * (0.088 / 48))
    assert KNEE.at(2048) == pytest.approx(1.920 + 1024 * (1.440 / 768))
    with pytest.raises(ValueError):
        StepTimes((4, 2), (0.1, 0.2))
    with pytest.raises(ValueError):
        StepTimes((1, 2), (0.2, 0.1))


def test_expected_tokens():
    assert expected_tokens([]) == 1
    assert expected_tokens([1.0] * 3) == 4
    assert expected_tokens([0.5, 0.5]) == pytest.approx(1.75)
    assert expected_tokens([0.6] * 5) == pytest.approx((1 - 0.6**6) / 0.4)


@pytest.mark.parametrize("batch_rows", [0, LARGE_BATCH])
@pytest.mark.parametrize("table", [KNEE, FLAT], ids=["knee", "flat"])
def test_never_accepted_means_no_speculation(table, batch_rows):
    model = CostModel(table, k_max=8, draft_seconds_per_token=1e-5)
    assert model.choose(never(), batch_rows).k == 0
    assert CostModel(table, k_max=8).choose(never(), batch_rows).k == 0  # free drafts that never land: still 0
    assert CostModel(table, k_max=8).choose(SeqAcceptance(prior=0.0), batch_rows).k == 0


@pytest.mark.parametrize("batch_rows", [0, LARGE_BATCH])
def test_always_accepted_speculates_at_batch_one_and_at_a_large_batch(batch_rows):
    model = CostModel(KNEE, k_max=8, draft_seconds_per_token=1e-4)
    plan = model.choose(always(), batch_rows)
    assert plan.k > 0
    assert plan.tokens_per_second > model.rate([], batch_rows)
    assert model.choose(always(), 0).k == 8, "free verification up to the knee: all of k_max"


def test_costly_drafts_shorten_k():
    """A drafter costing a third of a step per token is worth fewer tokens than a free one."""
    seq = SeqAcceptance(prior=0.7)
    free = CostModel(FLAT, k_max=8).choose(seq, 0).k
    costly = CostModel(FLAT, k_max=8, draft_seconds_per_token=0.010).choose(seq, 0).k
    assert free == 8 and 0 < costly < free


def test_whole_step_rate_turns_speculation_down_under_load():
    """Counting the other sequences' tokens, drafts at 60% acceptance pay at batch 1 and not past the knee."""
    seq = SeqAcceptance(prior=0.6)
    model = CostModel(KNEE, k_max=8)
    assert model.choose(seq, 0, batch_tokens=0).k > 0
    assert model.choose(seq, LARGE_BATCH, batch_tokens=LARGE_BATCH).k == 0


def test_candidates_chosen_where_they_pay():
    """Three candidates land more often: worth it while rows are free, not past the knee."""
    seq = SeqAcceptance(prior=0.5)
    for _ in range(40):
        seq.update(drafted=4, accepted=1, candidates=1)
        seq.update(drafted=4, accepted=3, candidates=3)
    model = CostModel(KNEE, k_max=4)
    assert model.choose(seq, 0).candidates == 3
    assert model.choose(seq, LARGE_BATCH, batch_tokens=LARGE_BATCH).candidates == 1


def test_acceptance_by_position_is_a_moving_average_of_what_was_tried():
    seq = SeqAcceptance(prior=0.5, decay=0.5)
    seq.update(drafted=4, accepted=2)  # positions 0 and 1 passed, 2 failed, 3 never tried
    assert seq.alphas(4) == [0.75, 0.75, 0.25, 0.5]
    seq.update(drafted=4, accepted=4)
    assert seq.alphas(5) == [0.875, 0.875, 0.625, 0.75, 0.5]
    seq.update(drafted=0, accepted=0)
    assert seq.steps_without_draft == 1 and seq.alphas(1) == [0.875]


def test_a_sequence_left_at_zero_is_probed():
    model = CostModel(KNEE, k_max=4, probe_interval=5)
    seq = never()
    for _ in range(4):
        assert model.choose(seq, 0).k == 0
        seq.update(0, 0)
    seq.update(0, 0)
    plan = model.choose(seq, 0)
    assert plan.k == 1 and plan.probe


def test_min_gain_keeps_marginal_speculation_off():
    seq = SeqAcceptance(prior=0.02)
    assert CostModel(FLAT, k_max=4, min_gain=0.0).choose(seq, 0).k > 0
    assert CostModel(FLAT, k_max=4, min_gain=0.05).choose(seq, 0).k == 0


@pytest.fixture(scope="module")
def runner():
    return ModelRunner.from_config(EngineConfig(kv_cache_gib=0.05, max_model_len=512))


def test_measured_step_times_of_the_default_model(runner, monkeypatch):
    """Twenty-nine forwards of at most 32 rows (about a second on 2 idle cores); the table grows with rows, and the
    cost model over it speculates when drafts land and not when they do not."""
    rows = []
    execute = runner.execute
    monkeypatch.setattr(
        runner, "execute", lambda items: rows.append(sum(len(i.token_ids) for i in items)) or execute(items)
    )
    table = measure_step_times(runner)
    measured = [1, 2, 3, 4, 5, 6, 8, 16, 32]
    assert rows == [1, 32] + measured * 3
    assert table.rows == tuple(measured) and all(s > 0 for s in table.seconds)
    assert table.at(32) > table.at(1), "32 verified rows cost no more than 1"
    proposer = SuffixProposer()
    text = list(range(50)) * 3
    draft_cost = measure_draft_cost(proposer.propose, [DraftRequest(i, text, 4, SamplingParams()) for i in range(16)])
    assert 0 < draft_cost < table.at(1)
    model = CostModel(table, k_max=8, draft_seconds_per_token=draft_cost)
    assert model.choose(never(), 0).k == 0 and model.choose(never(), 63).k == 0
    assert model.choose(always(), 0).k > 0 and model.choose(always(), 63).k > 0
