"""The optimizer: one named Ray actor per app that retrains drafters from the replicas' traffic (adaptation).

A thin shell over speculator/adaptation.py's `Optimizer`: replicas call `report` every few seconds with their
logged traffic and per-class signals and get back the live release of every class (a drafter's files only when
the replica's installed version differs). Retraining runs on the actor's own thread, so reports keep being
answered while it trains. The target is loaded here on the first retrain (its hidden states feed distillation).
The actor restarts after a crash (`max_restarts=-1`) and reads its releases back from `store_dir`; a retrain cut
short is started again when replicas report the class as drifted again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from model.config import EngineConfig
from model.loader import load_arch, resolve_model
from model.runner import ModelRunner
from speculator.adaptation import (
    AdaptationConfig,
    ClassSignal,
    Optimizer,
    TrafficRecord,
    Trainer,
    read_files,
)
from speculator.distill import DistillRecord, distill
from speculator.distill_data import teacher_forced_records
from speculator.factory import make_proposer
from speculator.mlp_checkpoint import save_speculator
from speculator.mlp_proposer import MLPProposer
from speculator.plan import NONE, drafter_kind, read_plan
from speculator.proposer import Proposer

log = logging.getLogger("ray.serve")
NAMESPACE = "specserve"


@dataclass(frozen=True)
class Assignment:
    """A class's live release as a replica needs it; `files` only when the replica does not hold it yet."""

    version: int
    expected_tokens_per_step: float
    files: dict[str, bytes] | None


def make_trainer(engine: EngineConfig, config: AdaptationConfig, runner: Any) -> Trainer:
    """The target-facing half of retraining, over a lazily loaded target runner (`runner()`)."""
    arch = load_arch(resolve_model(engine.model))
    plan = read_plan(engine.plan) if engine.plan else None

    def hidden(records: list[TrafficRecord]) -> list[DistillRecord]:
        out = teacher_forced_records(runner(), [(r.token_ids, r.output_start) for r in records])
        for rec, r in zip(out, records):
            rec.output_start = r.output_start
        return out

    def train(records: list[DistillRecord]) -> object:
        return distill(records, "mlp", target_vocab_size=arch.vocab_size, options=config.distill, progress=False).model

    def live(workload_class: str, released: Path | None) -> Proposer | None:
        if released is not None:
            return MLPProposer.load(released, target_hidden_size=arch.hidden_size, target_vocab_size=arch.vocab_size)
        name = plan.choice(workload_class).drafter if plan else "ngram"
        if name == NONE:
            return None
        folder = plan.drafter_models.get(name) if plan else None
        one = engine.model_copy(update={"speculator": drafter_kind(name), "plan": None, "speculator_model": folder})
        return make_proposer(one, device="cpu")

    return Trainer(
        hidden=hidden,
        distill=train,
        proposer=MLPProposer,
        live_proposer=live,
        save=save_speculator,
        k=engine.num_speculative_tokens,
    )


@ray.remote(max_restarts=-1, max_concurrency=4)
class OptimizerActor:
    def __init__(self, engine: dict[str, Any], adaptation: dict[str, Any]):
        self.engine_config = EngineConfig(**engine)
        self.config = AdaptationConfig(**adaptation)
        torch.set_num_threads(max(1, int(self.config.optimizer_cpus)))
        self._runner: ModelRunner | None = None
        self._lock = threading.Lock()  # reports and the retrain thread share the core's state
        self.core = Optimizer(self.config, make_trainer(self.engine_config, self.config, self._target))
        self.retraining: str | None = None
        self.errors = 0
        threading.Thread(target=self._loop, name="retrain", daemon=True).start()

    def _target(self) -> ModelRunner:
        if self._runner is None:
            self._runner = ModelRunner.from_config(self.engine_config, device="cpu")
        return self._runner

    def report(
        self, records: list[TrafficRecord], signals: list[ClassSignal], installed: dict[str, int]
    ) -> dict[str, Assignment]:
        with self._lock:
            self.core.add_traffic(records)
            rolled = self.core.observe(signals)
            live = self.core.assignments()
        for name in rolled:
            log.warning("adaptation: class %s rolled back (live acceptance fell after the swap)", name)
        out = {}
        for name, release in live.items():
            files = None if installed.get(name) == release.version else read_files(self.core.folder(release))
            out[name] = Assignment(release.version, release.score, files)
        return out

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "releases": [r.model_dump() for r in self.core.state.releases],
                "traffic": {name: len(q) for name, q in self.core.traffic.items()},
                "drifted": sorted(self.core.drifted),
                "retraining": self.retraining,
                "errors": self.errors,
            }

    def _loop(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                name = self.core.due()
                if name is not None:
                    job = self.core.start_retrain(name)
            if name is None:
                continue
            self.retraining = name
            try:
                candidate = self.core.train(job)
                with self._lock:
                    release = self.core.commit(job, candidate)
                log.info("adaptation: class %s -> v%d %s (%.2f vs live %.2f tokens/step)", name, release.version,
                         release.status, release.score, release.baseline)  # fmt: skip
            except Exception:  # noqa: BLE001 - a failed retrain is retried on the next drift report
                self.errors += 1
                log.exception("adaptation: retraining class %s failed", name)
            finally:
                self.retraining = None


def get_or_create_optimizer(app_name: str, engine: EngineConfig, config: AdaptationConfig) -> Any:
    """The app's optimizer actor, created by the first replica that asks. Detached, as replicas come and go: it
    outlives the app (its releases are in `store_dir`), so remove it with `ray.kill` when the app is deleted. It
    is placed outside the asking replica's placement group (one with a draft worker or shards has no room left)."""
    return OptimizerActor.options(
        name=f"specserve-optimizer-{app_name}",
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=config.optimizer_cpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    ).remote(engine.model_dump(), config.model_dump())
