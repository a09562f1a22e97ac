"""The adaptive loop's core without Ray: replay scoring, retraining on logged traffic with the default model,
the held-out judgement (a worse candidate is not released), rollback, state across a restart, and drafters swapped
into a running engine between steps with outputs unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deployments.optimizer_actor import make_trainer
from model.config import EngineConfig
from sampling.params import SamplingParams
from speculator.adaptation import AdaptationConfig, ClassSignal, Optimizer, TrafficRecord
from speculator.cost_model import StepTimes
from speculator.distill import DistillOptions, DistillRecord, holdout
from speculator.mlp_proposer import MLPProposer
from speculator.mlp_speculator import MLPSpeculator, MLPSpeculatorConfig
from speculator.plan import build_plan
from speculator.proposer import Draft, DraftRequest, Proposer
from speculator.replay import replay
from speculator.workload_class import ClassRule, rules_spec
from tests.conftest import humaneval_prompts

CONFIG = {"kv_cache_gib": 0.25, "max_model_len": 1024}


class Oracle(Proposer):
    """Proposes the recorded continuation itself, `right` tokens of it, then a wrong one."""

    def __init__(self, truth: list[int], right: int):
        self.truth, self.right = truth, right

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        r = requests[0]
        n = len(r.token_ids)
        tokens = self.truth[n : n + self.right] + [-1]
        return [Draft(tokens[: r.k])]


@pytest.mark.parametrize("questions,rounds", [(8, 4), (4, 8), (8, 8), (5, 7)])
def test_the_held_out_slice_is_not_aligned_with_traffic_that_repeats(questions, rounds):
    """The same questions asked each round, in order: every fourth record would hold out all copies of a few
    questions and train on none of them. The pseudo-random slice draws from several, each also trained on."""
    n = questions * rounds
    held = holdout(n, 4)
    assert len(held) == n // 4 and held <= set(range(n)) and holdout(n, 4) == held
    held_questions = {i % questions for i in held}
    trained_questions = {i % questions for i in range(n) if i not in held}
    assert held_questions <= trained_questions and len(held_questions) > min(2, questions - 1)


def test_replay_counts_tokens_per_step_as_verification_emits_them():
    tokens = list(range(100, 130))  # 5 prompt tokens, 25 output tokens
    rec = DistillRecord(tokens, torch.zeros(26, 4), hidden_start=4, output_start=5)
    never = replay(Oracle(tokens, 0), [rec], k=4)
    assert never.tokens_per_step == 1.0 and never.steps == 24  # the first output token comes from the prefill
    two = replay(Oracle(tokens, 2), [rec], k=4)
    assert two.steps == 8 and two.tokens_per_step == pytest.approx(24 / 8)
    assert two.acceptance_by_position() == [1.0, 1.0, 0.0, 0.0]
    always = replay(Oracle(tokens, 10), [rec], k=4)
    assert always.tokens_per_step == pytest.approx(24 / 5)  # 5 steps: 5 + 5 + 5 + 5 + 4


@pytest.fixture(scope="module")
def traffic(make_engine) -> list[TrafficRecord]:
    """The target's greedy answers to 32 HumanEval prompts, logged as one class's traffic."""
    engine = make_engine(**CONFIG)
    outs = engine.generate(humaneval_prompts(32), SamplingParams(max_tokens=40, ignore_eos=True))
    return [TrafficRecord("code", o.prompt_token_ids + o.output_token_ids, len(o.prompt_token_ids)) for o in outs]


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory) -> str:
    """A plan whose class "code" (prompts with "def ") does not draft: nothing paid when it was profiled."""
    plan = build_plan(rules_spec([ClassRule(name="code", regex="def ")]), StepTimes((1, 2), (0.01, 0.0101)), {}, 4)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(plan.model_dump_json())
    return str(path)


def optimizer(make_engine, store: Path, plan: str | None, **over) -> Optimizer:
    engine = make_engine(**CONFIG)
    config = AdaptationConfig(
        enabled=True,
        store_dir=str(store),
        min_records=16,
        retrain_cooldown_s=0,
        distill=DistillOptions(n_predict=3, draft_vocab=1024, epochs=12, batch_size=32, lr=3e-3),
        **over,
    )

    def runner():
        engine.reset_kv()  # the teacher-forced pass writes pages freely: no request is in flight here
        return engine.runner

    target = EngineConfig(**CONFIG, speculator="auto", plan=plan)
    return Optimizer(config, make_trainer(target, config, runner))


@pytest.fixture(scope="module")
def released(make_engine, traffic, plan_path, tmp_path_factory):
    """The class "code" retrained from its traffic, as the optimizer does on drift."""
    opt = optimizer(make_engine, tmp_path_factory.mktemp("store"), plan_path)
    opt.add_traffic(traffic)
    assert opt.due() is None  # nothing drifted yet
    opt.observe([ClassSignal("code", 0, 1.0, 20, drifted=True)])
    assert opt.due() == "code"
    return opt, opt.retrain("code")


def test_retrained_drafter_beats_no_drafting_on_held_out_traffic_and_is_released(make_engine, released, plan_path):
    opt, release = released
    # the plan has no drafter for the class: the live baseline is plain decoding, one token per step
    assert release.baseline == 1.0 and release.heldout_records == 8 and release.train_records == 24
    assert release.status == "live" and release.score > 1.05, release
    assert set(opt.assignments()) == {"code"}
    drafter = MLPProposer.load(opt.folder(release), target_hidden_size=576, target_vocab_size=49152)
    assert drafter.max_k == 3
    # a restarted optimizer finds its releases in the store
    again = optimizer(make_engine, opt.store, plan_path)
    assert again.assignments()["code"].version == release.version
    # live acceptance at its level before the swap keeps it; falling well below rolls it back
    assert again.observe([ClassSignal("code", release.version, 0.9, 20, drifted=False)]) == []
    assert again.observe([ClassSignal("code", release.version, 0.5, 20, drifted=False)]) == ["code"]
    assert again.assignments() == {}  # 0.5 < 1.0 * (1 - 0.2): back to the plan's choice
    assert [r.status for r in again.state.releases] == ["rolled_back"]


def test_a_candidate_worse_than_the_live_drafter_is_not_released(make_engine, traffic, tmp_path):
    """An untrained speculator (random weights) against n-gram lookup, the router's drafter without a plan."""
    opt = optimizer(make_engine, tmp_path, None)
    opt.trainer = opt.trainer.__class__(**{**opt.trainer.__dict__, "distill": lambda records: untrained()})
    live = opt.trainer.live_proposer("code", None)
    assert type(live).__name__ == "NgramProposer"
    opt.add_traffic(traffic)
    opt.observe([ClassSignal("code", 0, 1.0, 20, drifted=True)])
    release = opt.retrain("code")
    assert release.status == "rejected" and release.score <= release.baseline, release
    assert opt.assignments() == {} and not any(tmp_path.glob("code-v*"))


def untrained() -> MLPSpeculator:
    torch.manual_seed(0)
    return MLPSpeculator(MLPSpeculatorConfig(emb_dim=576, inner_dim=64, vocab_size=49152, n_predict=3)).eval()


SWAP_PARAMS = SamplingParams(max_tokens=40, ignore_eos=True)


def plain_and_auto(make_engine, prompts: list[str], plan_path: str):
    """The prompts' plain greedy outputs, and an engine under `speculator: auto` with the plan to swap drafters in."""
    engine = make_engine(**CONFIG)
    engine.reset_kv()  # retraining ran teacher-forced passes over its pages
    plain = [o.output_token_ids for o in engine.generate(prompts, SWAP_PARAMS)]
    return plain, make_engine(**CONFIG, speculator="auto", plan=plan_path)


def test_a_drafter_swapped_into_a_running_engine_keeps_outputs_and_takes_over(make_engine, released, plan_path):
    """Requests in flight (of a class that did not draft) switch to the new drafter between steps; every output
    equals plain greedy decoding; the swapped drafter's counts carry its version; the engine logged its traffic."""
    opt, release = released
    prompts = humaneval_prompts(6)
    plain, auto = plain_and_auto(make_engine, prompts, plan_path)
    auto.log_traffic(64)
    ids = [auto.add_request(p, SWAP_PARAMS) for p in prompts]
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    steps = 0
    while auto.has_unfinished():
        if steps == 3:  # mid-flight: every request has its prompt prefilled and a few tokens out
            proposer = MLPProposer.load(opt.folder(release), target_hidden_size=576, target_vocab_size=49152)
            auto.install_drafter("code", "mlp:code", proposer, str(release.version))
        for out in auto.step():
            outputs[out.request_id] += out.new_token_ids
        steps += 1
    assert [outputs[i] for i in ids] == plain
    snapshot = auto.spec_snapshot()
    swapped = [v for key, v in snapshot.items() if key.drafter == "mlp:code"]
    assert swapped and swapped[0].total.drafted > 0 and key_version(snapshot, "mlp:code") == str(release.version)
    logged = auto.take_traffic()
    assert len(logged) == 6 and all(r.workload_class == "code" for r in logged)
    assert sorted(r.token_ids[r.output_start :] for r in logged) == sorted(plain)


def key_version(snapshot, drafter: str) -> str:
    return next(key.version for key in snapshot if key.drafter == drafter)


def test_a_rolled_back_drafter_stops_drafting_mid_flight_and_outputs_stay_plain(make_engine, released, plan_path):
    """The replica's side of a rollback (`restore_drafter`, what the agent calls when the optimizer no longer names
    a release): requests in flight go back to the plan's drafter for their class (here none) between steps, the
    rolled-back drafter drafts no more, and every output still equals plain greedy decoding."""
    opt, release = released
    prompts = humaneval_prompts(4)
    plain, auto = plain_and_auto(make_engine, prompts, plan_path)
    ids = [auto.add_request(p, SWAP_PARAMS) for p in prompts]
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    steps, at_restore, drafters = 0, None, {}
    while auto.has_unfinished():
        if steps == 2:
            proposer = MLPProposer.load(opt.folder(release), target_hidden_size=576, target_vocab_size=49152)
            auto.install_drafter("code", "mlp:code", proposer, str(release.version))
        if steps == 8:
            at_restore = drafted_by(auto, "mlp:code")
            auto.restore_drafter("code")
        if steps in (8, 9):  # the in-flight requests' drafters before and after the rollback's step
            drafters[steps] = {r.drafter for r in auto.requests.values()}
        for out in auto.step():
            outputs[out.request_id] += out.new_token_ids
        steps += 1
    assert [outputs[i] for i in ids] == plain
    assert drafters == {8: {"mlp:code"}, 9: {"none"}}
    assert at_restore and at_restore > 0 and drafted_by(auto, "mlp:code") == at_restore
    assert auto.router.route(auto.tokenizer.encode("def f():")).drafter == "none"


def drafted_by(engine, drafter: str) -> int:
    return sum(v.total.drafted for key, v in engine.spec_snapshot().items() if key.drafter == drafter)
