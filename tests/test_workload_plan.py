"""Plan maths on synthetic numbers, plan files, the routed proposer, and the prompt classifiers."""

from __future__ import annotations

import pytest
import torch

from sampling.params import SamplingParams
from speculator.cost_model import StepTimes, expected_tokens
from speculator.plan import (
    Acceptance,
    DrafterProfile,
    alphas_from_survival,
    best_choice,
    build_plan,
    read_plan,
)
from speculator.proposer import Draft, DraftRequest, Proposer
from speculator.routed import RoutedProposer
from speculator.workload_class import ClassRule, PromptClassifier, fit_kmeans, rules_spec

STEP = StepTimes((1, 2, 3, 4, 5), (0.010, 0.011, 0.012, 0.013, 0.014))


def profile(survival, seconds_per_token=0.0, name="code") -> DrafterProfile:
    return DrafterProfile(seconds_per_token=seconds_per_token, by_class={name: Acceptance(survival=survival, steps=50)})


def test_survival_gives_the_cost_models_expected_tokens():
    survival = [0.8, 0.6, 0.3, 0.0]
    assert expected_tokens(alphas_from_survival(survival)) == pytest.approx(1 + sum(survival))


def test_no_acceptance_means_no_drafter():
    choice = best_choice("code", STEP, {"ngram": profile([0.0] * 4), "suffix": profile([0.0] * 4, 1e-4)}, 4)
    assert (choice.drafter, choice.k, choice.expected_speedup) == ("none", 0, 1.0)


def test_the_best_expected_rate_wins():
    drafters = {
        "ngram": profile([0.5, 0.2, 0.05, 0.0]),
        "suffix": profile([0.7, 0.5, 0.4, 0.3]),
        "draft": profile([0.9, 0.8, 0.7, 0.6], seconds_per_token=0.02),  # accepts most, costs far too much
    }
    choice = best_choice("code", STEP, drafters, 4)
    assert choice.drafter == "suffix" and choice.k == 4
    assert choice.expected_speedup == pytest.approx((1 + 1.9) / 0.014 * 0.010, rel=1e-3)
    # The same drafter for free beats it.
    drafters["draft"] = profile([0.9, 0.8, 0.7, 0.6])
    assert best_choice("code", STEP, drafters, 4).drafter == "draft"


def test_k_stops_where_another_position_does_not_pay():
    steep = StepTimes((1, 2, 3), (0.010, 0.015, 0.020))
    choice = best_choice("code", steep, {"ngram": profile([0.9, 0.2, 0.1])}, 3)
    assert choice.k == 1


def test_plan_round_trips_through_its_file(tmp_path):
    spec = rules_spec([ClassRule(name="code", regex=r"def ")])
    plan = build_plan(spec, STEP, {"ngram": profile([0.6, 0.3])}, 2, {"code": 3, "other": 1})
    path = tmp_path / "plan.json"
    path.write_text(plan.model_dump_json())
    again = read_plan(path)
    assert again == plan
    assert [(c.name, c.drafter) for c in again.classes] == [("code", "ngram"), ("other", "none")]
    path.write_text('{"classes": []}')
    with pytest.raises(ValueError, match="not a workload plan"):
        read_plan(path)


class Recorder(Proposer):
    def __init__(self, token: int):
        self.token, self.seen, self.released = token, [], []

    def propose(self, requests):
        self.seen.append([(r.seq_id, r.k) for r in requests])
        return [Draft([self.token] * r.k) for r in requests]

    def release(self, seq_id):
        self.released.append(seq_id)


def test_routed_proposer_sends_each_sequence_to_its_drafter():
    a, b = Recorder(7), Recorder(8)
    b.max_k = 2
    routed = RoutedProposer({"a": a, "b": b}, default="a")
    params = SamplingParams()
    reqs = [DraftRequest(1, [1], 3, params, drafter="b"), DraftRequest(2, [1], 3, params, drafter="a")]
    reqs.append(DraftRequest(3, [1], 3, params, drafter="none"))
    drafts = routed.propose(reqs)
    assert [d.tokens for d in drafts] == [[8, 8], [7, 7, 7], []]
    assert a.seen == [[(2, 3)]] and b.seen == [[(1, 2)]]
    routed.release(1)
    routed.release(3)  # never drafted: nothing to release
    assert b.released == [1] and a.released == []


def test_rules_classify_by_the_first_matching_regex():
    spec = rules_spec([ClassRule(name="code", regex=r"def |import "), ClassRule(name="math", regex=r"\d+ ?\+")])
    clf = PromptClassifier(spec, None, lambda ids: "".join(chr(i) for i in ids))
    text = lambda s: [ord(c) for c in s]  # noqa: E731
    assert [clf.classify(text(s)) for s in ("def f(): 2+2", "what is 2 + 3", "hello")] == ["code", "math", "other"]
    with pytest.raises(ValueError, match="reserved"):
        rules_spec([ClassRule(name="other", regex="x")])


def test_kmeans_is_deterministic_and_picks_the_obvious_k():
    g = torch.Generator().manual_seed(0)
    blobs = [torch.randn(6, 8, generator=g) * 0.05 + torch.eye(8)[i] * 3 for i in range(3)]
    x = torch.cat(blobs)
    spec, labels = fit_kmeans(x)
    assert len(spec.names) == 3
    assert fit_kmeans(x) == (spec, labels)
    assert [len(set(labels[i * 6 : i * 6 + 6])) for i in range(3)] == [1, 1, 1]


def test_a_plan_is_only_read_by_speculator_auto():
    from model.config import EngineConfig

    with pytest.raises(ValueError, match="only read by speculator 'auto'"):
        EngineConfig(speculator="ngram", plan="plan.json")
    assert EngineConfig(speculator="auto").plan is None  # no plan: n-gram for every request
