"""Speculation by workload class, drafter and version (engine/spec_monitor.py): on a real `speculator: auto` run
each class's steps land under its own key and add up to the engine's aggregate; the window keeps only the last
requests; a drafter's new version labels the steps after it."""

from __future__ import annotations

import pytest

from engine.metrics import SpecCounters
from engine.spec_monitor import SpecKey, SpecMonitor
from sampling.params import SamplingParams
from speculator.drift import current
from speculator.ngram import NgramProposer
from speculator.plan import ClassChoice, StepProfile, WorkloadPlan, read_plan
from speculator.workload_class import ClassRule, rules_spec
from tests.conftest import humaneval_prompts

ENGINE = {"kv_cache_gib": 0.25, "max_model_len": 1024}
CODE, OTHER = SpecKey("code", "ngram", "0"), SpecKey("other", "suffix", "0")


def two_class_plan(path) -> str:
    """Rules: a prompt with `def ` is code (n-gram), anything else other (suffix)."""
    plan = WorkloadPlan(
        classifier=rules_spec([ClassRule(name="code", regex=r"def ")]),
        classes=[
            ClassChoice(name="code", drafter="ngram", k=3, expected_tokens_per_step=2.0),
            ClassChoice(name="other", drafter="suffix", k=3, expected_tokens_per_step=1.5),
        ],
        step_times=StepProfile(rows=[1, 2, 3, 4], seconds=[0.01, 0.011, 0.012, 0.013]),
    )
    path.write_text(plan.model_dump_json())
    read_plan(path)  # a plan `speculator: auto` accepts
    return str(path)


def summed(counters) -> SpecCounters:
    out = SpecCounters()
    for c in counters:
        out.add(c)
    return out


def fields(c: SpecCounters) -> tuple:
    return c.steps, c.drafted, c.accepted, c.emitted, c.drafted_per_pos, c.accepted_per_pos


@pytest.fixture(scope="module")
def auto_engine(make_engine, tmp_path_factory):
    return make_engine(speculator="auto", plan=two_class_plan(tmp_path_factory.mktemp("mon") / "plan.json"), **ENGINE)


def chats(*questions: str) -> list[list[dict]]:
    return [[{"role": "user", "content": q}] for q in questions]


def test_each_class_counts_under_its_own_key_and_all_add_up_to_the_engines(auto_engine):
    engine = auto_engine
    prompts = [*humaneval_prompts(2), *chats("What is the capital of France?", "Tell me a joke about cats.")]
    outs = engine.generate(prompts, SamplingParams(max_tokens=16))
    snap = engine.spec_snapshot()
    assert set(snap) == {CODE, OTHER}
    assert fields(summed(s.total for s in snap.values())) == fields(engine.spec)  # nothing counted twice or lost
    for key, mine in ((CODE, outs[:2]), (OTHER, outs[2:])):
        stats = snap[key]
        assert fields(stats.total) == fields(summed(o.metrics.spec for o in mine))
        assert stats.requests == stats.window_requests == 2
        assert fields(stats.window) == fields(stats.total)  # nothing left the window yet
        assert stats.total.steps > 0
    assert snap[CODE].total.drafted > 0  # HumanEval repeats its own names: n-gram lookup finds drafts


def test_a_new_version_labels_the_steps_after_it(auto_engine):
    """A drafter swapped in mid-request (engine/drafter_swap.py): the request's later steps count under it."""
    engine = auto_engine
    before, other = engine.spec_snapshot()[CODE], engine.spec_snapshot()[OTHER]
    rid = engine.add_request(humaneval_prompts(3)[2], SamplingParams(max_tokens=24, ignore_eos=True))
    req = engine.requests[rid]
    assert req.workload_class == "code" and req.drafter == "ngram" and req.spec_track.key.version == "0"
    while req.metrics.spec.steps < 3:
        engine.step()
    steps_before_swap = req.metrics.spec.steps
    ngram = NgramProposer(engine.config.ngram_min, engine.config.ngram_max)
    engine.install_drafter("code", "ngram", ngram, "1")
    try:
        engine.step()  # the swap applies before this step
        assert req.spec_track.key.version == "1"
        out = [o for o in engine.run() if o.finished][-1]
    finally:
        engine.install_drafter("code", "ngram", ngram, "0")
        engine.step()  # applies the swap back
    snap = engine.spec_snapshot()
    old, new = snap[CODE], snap[SpecKey("code", "ngram", "1")]
    assert old.total.steps - before.total.steps == steps_before_swap
    assert new.total.steps == out.metrics.spec.steps - steps_before_swap > 0
    assert old.window_requests == before.window_requests + 1 and new.window_requests == 1  # a stretch each
    assert fields(snap[OTHER].total) == fields(other.total)  # the other class's drafter kept its version
    assert current(snap)["code"].key == new.key  # the drafter in use, at its latest version


def test_the_window_keeps_the_last_requests_and_the_total_all():
    monitor = SpecMonitor(window_requests=2)
    key = SpecKey("default", "ngram", "0")
    for drafted, accepted in ((4, 4), (4, 0), (2, 1)):  # three requests of one step each
        track = monitor.track(key)
        monitor.record(track, drafted, accepted, accepted + 1)
        monitor.finish(track)
    stats = monitor.snapshot()[key]
    assert (stats.requests, stats.window_requests) == (3, 2)
    assert (stats.total.drafted, stats.total.accepted, stats.total.steps) == (10, 5, 3)
    assert (stats.window.drafted, stats.window.accepted, stats.window.steps) == (6, 1, 2)  # the first one left
    assert stats.window_acceptance_rate == pytest.approx(1 / 6)
    assert stats.window_tokens_per_step == pytest.approx(3 / 2)
    assert stats.window_acceptance_by_position() == [0.5, 0.0, 0.0, 0.0]


def test_a_snapshot_is_a_copy():
    monitor = SpecMonitor()
    key = SpecKey("default", "ngram", "0")
    track = monitor.track(key)
    monitor.record(track, 2, 1, 2)
    snap = monitor.snapshot()
    monitor.record(track, 2, 2, 3)
    monitor.finish(track)
    assert (snap[key].total.steps, snap[key].window_requests) == (1, 0)
    assert monitor.snapshot()[key].total.steps == 2


def test_without_speculation_requests_count_under_drafter_none(make_engine):
    engine = make_engine(**ENGINE)
    before = engine.spec_snapshot().get(SpecKey("default", "none", "0"))
    engine.generate(["Hello"], SamplingParams(max_tokens=4))
    stats = engine.spec_snapshot()[SpecKey("default", "none", "0")]
    assert stats.requests == (before.requests if before else 0) + 1
    assert stats.total.steps == 0 and stats.window_tokens_per_step == 0.0  # no verification step, no drafts
