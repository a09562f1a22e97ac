"""The adaptive loop's core: from logged traffic and drift signals to drafter releases, plain Python.

Replicas log what they serve (`TrafficRecord`), watch acceptance per workload class and report drift (a class below
its plan's expected tokens per step, or a class the plan does not name). On drift the optimizer distills an MLP
speculator for that class from the class's logged sequences (the target's hidden states come from one
teacher-forced pass), replays it and the live drafter on a held-out slice of the same traffic
(speculator/replay.py), and releases it only if it emits more tokens per verification step by `min_gain`.
Replicas pull releases and swap them in between engine steps. A release whose live tokens per step falls below
what the class had before it, by `rollback_margin`, is rolled back to the previous one.

Releases and their drafters are kept in `store_dir` (state.json, one folder per release), so the optimizer
resumes after a restart with what is live; the traffic log is not kept (replicas go on sending it).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from speculator.distill import DistillOptions, DistillRecord, holdout
from speculator.proposer import Proposer
from speculator.replay import replay

Status = Literal["live", "rejected", "rolled_back", "replaced"]


class AdaptationConfig(BaseModel):
    """`adaptation:` in serve_config.yaml. Off by default: logging traffic keeps prompts and outputs in memory."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    store_dir: str = Field(default="~/.cache/specserve/adaptation", min_length=1)
    records_per_class: int = Field(default=512, ge=4, description="logged sequences kept per class (newest)")
    min_records: int = Field(default=24, ge=4, description="logged sequences of a class before it is retrained")
    holdout_every: int = Field(default=4, ge=2, description="one logged sequence in N judges, the rest train")
    drift_margin: float = Field(default=0.2, ge=0, lt=1, description="below expected tokens/step by this share")
    drift_requests: int = Field(default=8, ge=1, description="finished requests a drift verdict needs")
    window_requests: int = Field(default=32, ge=1, description="the sliding window acceptance is watched over")
    min_gain: float = Field(default=0.05, ge=0, description="a candidate must beat the live drafter by this share")
    rollback_margin: float = Field(default=0.2, ge=0, lt=1)
    retrain_cooldown_s: float = Field(default=60.0, ge=0, description="between two retrains of one class")
    report_interval_s: float = Field(default=5.0, gt=0)
    optimizer_cpus: float = Field(default=1.0, ge=0)
    distill: DistillOptions = Field(default_factory=lambda: DistillOptions(epochs=6, draft_vocab=2048))


@dataclass(frozen=True)
class TrafficRecord:
    """One served sequence: prompt + output ids and where the output starts."""

    workload_class: str
    token_ids: list[int]
    output_start: int


@dataclass(frozen=True)
class ClassSignal:
    """A replica's view of one class: its live version's window tokens per step, and whether that is drift."""

    workload_class: str
    version: int
    tokens_per_step: float
    requests: int
    drifted: bool


class Release(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workload_class: str
    version: int
    kind: str = "mlp"
    status: Status
    score: float  # the candidate's replayed tokens per step on the held-out slice
    baseline: float  # the live drafter's, on the same slice
    observed_before: float  # the class's live tokens per step when the retrain started
    train_records: int
    heldout_records: int
    seconds: float
    created: float


class OptimizerState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    releases: list[Release] = Field(default_factory=list)
    next_version: int = 1

    def live(self, workload_class: str) -> Release | None:
        mine = [r for r in self.releases if r.workload_class == workload_class and r.status == "live"]
        return mine[-1] if mine else None


@dataclass(frozen=True)
class RetrainJob:
    workload_class: str
    logged: list[TrafficRecord]
    observed_before: float
    live: Release | None
    started: float


@dataclass(frozen=True)
class Candidate:
    model: object
    score: float
    baseline: float
    train_records: int
    heldout_records: int


@dataclass(frozen=True)
class Trainer:
    """What retraining needs from the target, injected so the core stays plain: hidden states along sequences,
    a drafter distilled from records, a proposer for a trained drafter, the live proposer of a class (its plan's
    drafter, or the one in its live release's folder), saving a drafter folder."""

    hidden: Callable[[list[TrafficRecord]], list[DistillRecord]]
    distill: Callable[[list[DistillRecord]], object]
    proposer: Callable[[object], Proposer]
    live_proposer: Callable[[str, Path | None], Proposer | None]
    save: Callable[[object, Path], None]
    k: int


class Optimizer:
    def __init__(self, config: AdaptationConfig, trainer: Trainer, clock: Callable[[], float] = time.time):
        self.config, self.trainer, self.clock = config, trainer, clock
        self.store = Path(config.store_dir).expanduser()
        self.store.mkdir(parents=True, exist_ok=True)
        self.state = self._load()
        self.traffic: dict[str, deque[TrafficRecord]] = {}
        self.drifted: dict[str, float] = {}  # class -> its live tokens per step when drift was reported
        self.last_retrain: dict[str, float] = {}

    # ---- state ----------------------------------------------------------------------------------------

    def _load(self) -> OptimizerState:
        path = self.store / "state.json"
        return OptimizerState.model_validate_json(path.read_text()) if path.exists() else OptimizerState()

    def _save(self) -> None:
        tmp = self.store / "state.json.tmp"
        tmp.write_text(self.state.model_dump_json(indent=1))
        tmp.replace(self.store / "state.json")  # atomic: a restart never reads half a state

    def folder(self, release: Release) -> Path:
        return self.store / f"{release.workload_class}-v{release.version}"

    # ---- what replicas send -----------------------------------------------------------------------------

    def add_traffic(self, records: list[TrafficRecord]) -> None:
        for r in records:
            log = self.traffic.setdefault(r.workload_class, deque(maxlen=self.config.records_per_class))
            log.append(r)

    def observe(self, signals: list[ClassSignal]) -> list[str]:
        """Take replicas' signals: drift marks a class for retraining; a live release that does worse than the
        class did before it is rolled back. Returns the classes rolled back."""
        rolled = []
        for s in signals:
            live = self.state.live(s.workload_class)
            if s.drifted and (live is None or s.version == live.version):
                self.drifted.setdefault(s.workload_class, s.tokens_per_step)
            if (
                live is not None
                and s.version == live.version
                and s.requests >= self.config.drift_requests
                and s.tokens_per_step < live.observed_before * (1 - self.config.rollback_margin)
            ):
                live.status = "rolled_back"
                previous = self._previous(live)
                if previous is not None:
                    previous.status = "live"
                self._save()
                rolled.append(s.workload_class)
        return rolled

    def _previous(self, release: Release) -> Release | None:
        name = release.workload_class
        older = [r for r in self.state.releases if r.workload_class == name and r.status == "replaced"]
        return older[-1] if older else None

    def assignments(self) -> dict[str, Release]:
        """The live release per class (classes without one use their plan's drafter)."""
        out = {}
        for r in self.state.releases:
            if r.status == "live":
                out[r.workload_class] = r
        return out

    # ---- retraining ----------------------------------------------------------------------------------------

    def due(self) -> str | None:
        """A drifted class with enough logged traffic and no recent retrain, if any."""
        now = self.clock()
        for name in self.drifted:
            enough = len(self.traffic.get(name, ())) >= self.config.min_records
            cooled = now - self.last_retrain.get(name, -1e18) >= self.config.retrain_cooldown_s
            if enough and cooled:
                return name
        return None

    def retrain(self, workload_class: str) -> Release:
        """Distill a candidate for the class from its logged traffic, judge it against the live drafter on the
        held-out slice, release it if it is better by `min_gain`. Returns the release (live or rejected)."""
        job = self.start_retrain(workload_class)
        return self.commit(job, self.train(job))

    def start_retrain(self, workload_class: str) -> RetrainJob:
        """The retrain's inputs, taken at once (the caller may hold a lock over this and `commit` only)."""
        now = self.clock()
        self.last_retrain[workload_class] = now
        before = self.drifted.pop(workload_class, 0.0)
        live = self.state.live(workload_class)
        return RetrainJob(workload_class, list(self.traffic.get(workload_class, ())), before, live, now)

    def train(self, job: RetrainJob) -> Candidate:
        """The slow part: hidden states, distillation, and both drafters replayed on the held-out slice."""
        records = self.trainer.hidden(job.logged)
        chosen = holdout(len(records), self.config.holdout_every)
        held = [r for i, r in enumerate(records) if i in chosen]
        train = [r for i, r in enumerate(records) if i not in chosen]
        model = self.trainer.distill(train)
        score = replay(self.trainer.proposer(model), held, self.trainer.k).tokens_per_step
        live = self.trainer.live_proposer(job.workload_class, self.folder(job.live) if job.live else None)
        baseline = replay(live, held, self.trainer.k).tokens_per_step if live is not None else 1.0
        return Candidate(model, score, baseline, len(train), len(held))

    def commit(self, job: RetrainJob, c: Candidate) -> Release:
        better = c.score > c.baseline * (1 + self.config.min_gain)
        release = Release(
            workload_class=job.workload_class,
            version=self.state.next_version,
            status="live" if better else "rejected",
            score=round(c.score, 4),
            baseline=round(c.baseline, 4),
            observed_before=round(job.observed_before, 4),
            train_records=c.train_records,
            heldout_records=c.heldout_records,
            seconds=round(self.clock() - job.started, 2),
            created=job.started,
        )
        self.state.next_version += 1
        if better:
            self.trainer.save(c.model, self.folder(release))
            self.drifted.pop(job.workload_class, None)  # reported while it trained, of the drafter it replaces
            live = self.state.live(job.workload_class)
            if live is not None:
                live.status = "replaced"
        self.state.releases.append(release)
        self._save()
        return release


def read_files(folder: Path) -> dict[str, bytes]:
    """A drafter folder's files, to send to replicas on other nodes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def write_files(files: dict[str, bytes], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / Path(name).name).write_bytes(data)
    return folder
