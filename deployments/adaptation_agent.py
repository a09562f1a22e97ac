"""A replica's side of the adaptive loop: every `report_interval_s` it sends the optimizer actor the traffic the
engine logged and a signal per workload class (its live drafter's window tokens per step, and whether that is
drift by speculator/drift.py), and swaps in what the optimizer has released since (engine/drafter_swap.py): built
in the replica's process, or, when the replica has a draft worker, installed in that actor and swapped in as a
remote drafter bound to its name (the client keeps the files, to install them again in a restarted actor).

Serving never waits on it: it runs on its own thread, a failed or slow call to the optimizer (restarting, busy)
only delays adaptation (the traffic it could not send is kept, bounded, for the next call).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from deployments.completion_cache_actor import BurstLog
from model.config import EngineConfig
from speculator.adaptation import AdaptationConfig, ClassSignal, TrafficRecord
from speculator.drift import DriftDetector, current, expected_from_plan
from speculator.factory import released_drafter
from speculator.plan import read_plan
from speculator.proposer import Proposer

if TYPE_CHECKING:
    from deployments.draft_worker import DraftWorkerClient

log = logging.getLogger("ray.serve")
CALL_TIMEOUT_S = 10.0


def drafter_name(workload_class: str) -> str:
    """The routed proposer's name of a class's adapted drafter."""
    return f"mlp:{workload_class}"


class AdaptationAgent:
    def __init__(
        self,
        engine: Any,
        engine_config: EngineConfig,
        config: AdaptationConfig,
        connect: Callable[[], Any],
        draft_worker: DraftWorkerClient | None = None,
    ):
        self.engine, self.config, self._connect = engine, config, connect
        self.engine_config, self.draft_worker = engine_config, draft_worker
        plan = read_plan(engine_config.plan) if engine_config.plan else None
        self.plan_expected = expected_from_plan(plan) if plan else {}
        self.detector = DriftDetector(self.plan_expected, config.drift_margin, config.drift_requests)
        self.installed: dict[str, int] = {}  # class -> release version swapped in
        self.workdir = Path(tempfile.mkdtemp(prefix="specserve-drafters-"))
        self._actor: Any = None
        self._unsent: list[TrafficRecord] = []
        self._log = BurstLog()

    def signals(self) -> list[ClassSignal]:
        snapshot = self.engine.spec_snapshot()
        drifted = {d.workload_class for d in self.detector.check(snapshot)}
        out = []
        for name, stats in sorted(current(snapshot).items()):
            version = self.installed.get(name, 0)
            if stats.key.version != str(version) and version:  # no request has finished on the new drafter yet
                continue
            observed = stats.window_tokens_per_step or 1.0  # a class that does not draft emits one token a step
            out.append(ClassSignal(name, version, observed, stats.window_requests, name in drifted))
        return out

    def tick(self) -> None:
        records = (self._unsent + self.engine.take_traffic())[-self.config.records_per_class :]
        signals = self.signals()
        try:
            if self._actor is None:
                self._actor = self._connect()
            answer = ray.get(self._actor.report.remote(records, signals, dict(self.installed)), timeout=CALL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - adaptation waits for the optimizer; serving does not
            self._unsent, self._actor = records, None
            if self._log.should_log(time.monotonic()):
                log.warning("adaptation: optimizer unreachable (%s); retrying", e)
            return
        self._unsent = []
        for name, assignment in answer.items():
            if self.installed.get(name) != assignment.version and assignment.files is not None:
                self._install(name, assignment.version, assignment.files, assignment.expected_tokens_per_step)
        for name in [n for n in self.installed if n not in answer]:  # rolled back to the plan's drafter
            self.engine.restore_drafter(name)
            del self.installed[name]
            self._expect(name, self.plan_expected.get(name))
            log.warning("adaptation: class %s back on its plan's drafter", name)

    def _install(self, name: str, version: int, files: dict[str, bytes], expected: float) -> None:
        drafter = drafter_name(name)
        try:
            proposer: Proposer
            if self.draft_worker is not None:
                proposer = self.draft_worker.install(drafter, files, str(version))
            else:
                proposer = released_drafter(self.engine_config, files, self.workdir / f"{name}-v{version}")
        except Exception as e:  # noqa: BLE001 - e.g. the draft worker restarting: the next tick tries again
            if self._log.should_log(time.monotonic()):
                log.warning("adaptation: cannot install release v%d of class %s (%s); retrying", version, name, e)
            return
        self.engine.install_drafter(name, drafter, proposer, str(version))
        self.installed[name] = version
        self._expect(name, expected)
        log.info("adaptation: class %s now drafts with release v%d", name, version)

    def _expect(self, name: str, expected: float | None) -> None:
        if expected is None:
            self.detector.expected.pop(name, None)
        else:
            self.detector.expected[name] = expected
