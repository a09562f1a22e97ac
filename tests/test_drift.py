"""Drift from the plan (speculator/drift.py) over the engine's speculation snapshots (engine/spec_monitor.py)."""

from __future__ import annotations

import pytest

from engine.spec_monitor import SpecKey, SpecMonitor
from speculator.drift import Drift, DriftDetector, expected_from_plan
from speculator.plan import ClassChoice, StepProfile, WorkloadPlan
from speculator.workload_class import ClassRule, rules_spec

CODE = SpecKey("code", "ngram", "0")


def finish(monitor: SpecMonitor, key: SpecKey, emitted_per_step: list[int], times: int = 1) -> None:
    """`times` requests whose steps emitted these many tokens each (k = 3 drafted per step)."""
    for _ in range(times):
        track = monitor.track(key)
        for emitted in emitted_per_step:
            monitor.record(track, 3, emitted - 1, emitted)
        monitor.finish(track)


def test_below_plan_fires_only_after_min_requests():
    monitor, detector = SpecMonitor(), DriftDetector({"code": 2.0}, margin=0.2, min_requests=3)
    finish(monitor, CODE, [1, 1], times=2)
    assert detector.check(monitor.snapshot()) == []  # 2 requests: too few to tell
    finish(monitor, CODE, [1, 1])
    assert detector.check(monitor.snapshot()) == [Drift("code", "below_plan", 2.0, 1.0, 3)]


@pytest.mark.parametrize(("emitted", "fires"), [([2] * 7 + [1] * 3, False), ([2] * 5 + [1] * 5, True)])
def test_below_plan_fires_only_beyond_the_margin(emitted, fires):
    """Expected 2.0 with a 20 % margin: 1.7 tokens per step is within it, 1.5 is not."""
    monitor, detector = SpecMonitor(), DriftDetector({"code": 2.0}, margin=0.2, min_requests=2)
    finish(monitor, CODE, emitted, times=2)
    assert bool(detector.check(monitor.snapshot())) is fires


def test_a_class_at_its_plans_level_does_not_fire_and_a_new_class_does():
    monitor, detector = SpecMonitor(), DriftDetector({"code": 2.0}, margin=0.1, min_requests=2)
    finish(monitor, CODE, [3, 1], times=4)
    chat = SpecKey("chat", "suffix", "0")
    finish(monitor, chat, [1])
    assert detector.check(monitor.snapshot()) == []  # one chat request: not a class yet
    finish(monitor, chat, [1])
    assert detector.check(monitor.snapshot()) == [Drift("chat", "new_class", None, 1.0, 2)]


def test_only_the_drafter_in_use_at_its_latest_version_counts():
    monitor, detector = SpecMonitor(), DriftDetector({"code": 2.0}, margin=0.1, min_requests=2)
    finish(monitor, CODE, [1], times=5)
    assert [d.reason for d in detector.check(monitor.snapshot())] == ["below_plan"]
    swapped = SpecKey("code", "ngram", "1")
    finish(monitor, swapped, [2, 3], times=2)  # the retrained drafter is at plan level
    assert detector.check(monitor.snapshot()) == []
    finish(monitor, SpecKey("code", "suffix", "0"), [1], times=2)  # then the class moved to another drafter
    assert [(d.reason, d.requests) for d in detector.check(monitor.snapshot())] == [("below_plan", 2)]


def test_a_class_that_does_not_draft_is_never_below_plan():
    monitor, detector = SpecMonitor(), DriftDetector({"other": 1.0}, margin=0.1, min_requests=1)
    track = monitor.track(SpecKey("other", "none", "0"))
    monitor.finish(track)
    assert detector.check(monitor.snapshot()) == []


def test_expected_tokens_per_step_come_from_the_plan():
    plan = WorkloadPlan(
        classifier=rules_spec([ClassRule(name="code", regex=r"def ")]),
        classes=[
            ClassChoice(name="code", drafter="ngram", k=3, expected_tokens_per_step=2.4),
            ClassChoice(name="other"),
        ],
        step_times=StepProfile(rows=[1], seconds=[0.01]),
    )
    assert expected_from_plan(plan) == {"code": 2.4, "other": 1.0}
    with pytest.raises(ValueError):
        DriftDetector({}, margin=1.0, min_requests=1)
