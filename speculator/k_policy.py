"""Each sequence's k from the speculation cost model (speculator/cost_model.py): speculate only where it pays.

`CostPolicy` is engine-wide: the target's step time by verified rows (measured once at start-up) and a running
estimate of the drafter's cost per proposed token (timed on its proposals). `CostKController` is per sequence,
with the interface of the backoff controller (speculator/backoff.py): `update(drafted, accepted)` after a step,
`next_k(batch_rows, batch_tokens)` before the next, where the batch is the rest of the step (the rows it verifies
and the tokens it emits). So k shrinks as the batch grows past the target's knee, and drops to 0 (with a k = 1
probe now and then) for a sequence whose drafts are not accepted.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from speculator.cost_model import CostModel, SeqAcceptance, StepTimes, expected_tokens
from speculator.proposer import Draft, DraftRequest


@dataclass
class DraftCost:
    """Running estimate of the drafter's seconds per proposed token: the mean of the first proposals, then an
    exponentially weighted one. The first `skip` calls (one-time set-up) are not counted."""

    seconds_per_token: float = 0.0
    decay: float = 0.9
    skip: int = 1
    calls: int = 0

    def observe(self, seconds: float, tokens: int) -> None:
        if tokens <= 0:
            return
        self.calls += 1
        n = self.calls - self.skip
        if n <= 0:
            return
        weight = max(1.0 - self.decay, 1.0 / n)
        self.seconds_per_token += weight * (seconds / tokens - self.seconds_per_token)


@dataclass
class CostKController:
    """One sequence's k: its acceptance by position, judged by the engine's shared cost model."""

    model: CostModel
    acceptance: SeqAcceptance = field(default_factory=SeqAcceptance)
    k: int = 0  # the last k chosen
    tokens: float = 1.0  # what a step with that k is expected to emit (the bonus token included)

    def update(self, drafted: int, accepted: int) -> None:
        self.acceptance.update(drafted, accepted)

    def next_k(self, batch_rows: int = 0, batch_tokens: float = 0.0) -> int:
        """k for the next step, the rest of which verifies `batch_rows` rows and emits about `batch_tokens`."""
        self.k = self.model.choose(self.acceptance, batch_rows, batch_tokens).k
        self.tokens = expected_tokens(self.acceptance.alphas(self.k))
        if self.k == 0:  # no draft next step: counts towards the next probe
            self.acceptance.steps_without_draft += 1
        return self.k


class CostPolicy:
    """The engine's cost model: makes the per-sequence controllers and times the proposer."""

    def __init__(self, step: StepTimes, k_max: int, probe_interval: int = 32):
        self.model = CostModel(step, k_max, probe_interval=probe_interval)
        self.draft_cost = DraftCost()

    def controller(self) -> CostKController:
        return CostKController(self.model)

    def observe_draft(self, seconds: float, tokens: int) -> None:
        self.draft_cost.observe(seconds, tokens)
        self.model.draft_seconds_per_token = self.draft_cost.seconds_per_token

    def timed(
        self, propose: Callable[[list[DraftRequest]], list[Draft]]
    ) -> Callable[[list[DraftRequest]], list[Draft]]:
        """`propose` that also feeds the drafter's cost estimate."""

        @functools.wraps(propose)
        def run(requests: list[DraftRequest]) -> list[Draft]:
            t0 = time.perf_counter()
            drafts = propose(requests)
            self.observe_draft(time.perf_counter() - t0, sum(len(d.tokens) for d in drafts))
            return drafts

        return run


_STEP_TIMES: dict[tuple, StepTimes] = {}


def cached_step_times(key: tuple, measure: Callable[[], StepTimes]) -> StepTimes:
    """The target's step times, measured once per process for each `key` (model, dtype, device, kernels...)."""
    if key not in _STEP_TIMES:
        _STEP_TIMES[key] = measure()
    return _STEP_TIMES[key]
