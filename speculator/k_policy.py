"""Each sequence's k from the speculation cost model (speculator/cost_model.py): speculate only where it pays.

`CostPolicy` is engine-wide: the target's step time by verified rows (measured once at start-up) and, per drafter,
a running estimate of what drafting costs a sequence (`DraftCost`, timed on the drafter's proposals).
`CostKController` is per sequence, with the interface of the backoff controller (speculator/backoff.py):
`update(drafted, accepted)` after a step, `next_k(batch_rows, batch_tokens)` before the next, where the batch is
the rest of the step (the rows it verifies and the tokens it emits). So k follows a sequence's runs of accepted
drafts (the backoff's, paused with a k = 1 probe now and then where drafts are not accepted) within what the batch
pays for: it shrinks as the batch grows past the target's knee, to 0 where even a run of hits does not pay for its
rows and its drafter.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from speculator.backoff import KController
from speculator.cost_model import CostModel, SeqAcceptance, StepTimes, expected_tokens
from speculator.proposer import Draft, DraftRequest, Proposer


@dataclass
class DraftCost:
    """Running estimate of one drafter's seconds per sequence and step: a call's time shared by the sequences it
    drafts for. Per sequence, not per token: a drafter's call costs about the same for 1 or k tokens (a lookup, a
    few small heads, an actor's round trip), so a per-token figure taken at k = 1 would price k = 3 at three calls.
    The mean of the first calls, then an exponentially weighted one; the first `skip` calls (one-time set-up) are
    not counted."""

    seconds_per_sequence: float = 0.0
    decay: float = 0.9
    skip: int = 1
    calls: int = 0

    def reset(self) -> None:
        """Start again (a new drafter under the same name)."""
        self.seconds_per_sequence, self.calls = 0.0, 0

    def observe(self, seconds: float, sequences: int) -> None:
        if sequences <= 0:
            return
        self.calls += 1
        n = self.calls - self.skip
        if n <= 0:
            return
        weight = max(1.0 - self.decay, 1.0 / n)
        self.seconds_per_sequence += weight * (seconds / sequences - self.seconds_per_sequence)


@dataclass
class CostKController:
    """One sequence's k: the backoff's (speculator/backoff.py: it follows the current run of accepted drafts and
    pauses on misses), capped at what the engine's shared cost model says pays at this step's batch.

    Acceptance comes in runs (a copied passage is accepted to its end, then drafts miss for a while), so the
    sequence keeps two estimates by position: for the step after a draft accepted whole (`after_hit`) and after a
    miss (`acceptance`). The cap is the best k for the first, positions not yet tried going on at the last tried
    one's rate: the best case, so with a small batch the backoff decides (a run is followed from its first hit),
    and a batch whose rows cost more than even a run of hits brings speculation down, to 0."""

    model: CostModel
    backoff: KController
    cost: DraftCost = field(default_factory=DraftCost)  # the sequence's drafter's, shared with its other sequences
    acceptance: SeqAcceptance = field(default_factory=SeqAcceptance)
    # A run's drafts past its first hit land about three times in four (n-gram and suffix lookup on HumanEval and
    # ShareGPT, scripts/bench_drafters.py's acceptance by position): the prior after a whole hit.
    after_hit: SeqAcceptance = field(default_factory=lambda: SeqAcceptance(prior=0.75))
    candidates: int = 1  # paths a drafted step verifies: a tree of that many takes up to k * candidates rows
    k: int = 0  # the last k chosen
    tokens: float = 1.0  # what a step with that k is expected to emit (the bonus token included)
    hot: bool = False  # the last drafted step kept all its drafts
    idle: int = 0  # steps in a row with k = 0

    def seed(self, alphas: list[float]) -> None:
        """Start the estimate after a miss from a class's measured acceptance by position (one chain). The one
        after a whole hit keeps its prior: a class's average says little of how a run goes on."""
        self.acceptance.by_candidates = {1: list(alphas)}
        self.acceptance.tries = {1: [1] * len(alphas)}

    @property
    def current(self) -> SeqAcceptance:
        return self.after_hit if self.hot else self.acceptance

    def update(self, drafted: int, accepted: int) -> None:
        self.backoff.update(drafted, accepted)
        self.current.update(drafted, accepted)
        if drafted > 0:
            self.hot = accepted == drafted

    def next_k(self, batch_rows: int = 0, batch_tokens: float = 0.0) -> int:
        """k for the next step, the rest of which verifies `batch_rows` rows and emits about `batch_tokens`."""
        alphas = self.after_hit.run_alphas(self.model.k_max)
        cap = self.model.best_k(
            alphas, batch_rows, batch_tokens, self.candidates, draft_seconds=self.cost.seconds_per_sequence
        ).k
        if cap == 0 and self.model.probe_due(self.idle):
            cap = 1  # the estimates learn only from drafted steps
        self.k = min(self.backoff.next_k(), cap)
        self.idle = 0 if self.k else self.idle + 1
        self.tokens = expected_tokens(self.current.alphas(self.k))
        return self.k


class CostPolicy:
    """The engine's cost model: makes the per-sequence controllers and times each drafter, by name."""

    def __init__(self, step: StepTimes, k_max: int, probe_interval: int = 32, candidates: int = 1):
        """`candidates`: the paths of the engine's token trees (1: chains); a sequence's k is priced at the rows
        its tree may take."""
        self.model = CostModel(step, k_max, probe_interval=probe_interval)
        self.costs: dict[str, DraftCost] = {}
        self.candidates = candidates

    def cost_of(self, drafter: str) -> DraftCost:
        return self.costs.setdefault(drafter, DraftCost())

    def controller(self, drafter: str, k: int | None = None) -> CostKController:
        """A new sequence's controller for `drafter`, its backoff starting from `k` (default: the most)."""
        backoff = KController(self.model.k_max) if k is None else KController(self.model.k_max, k=k)
        return CostKController(self.model, backoff, cost=self.cost_of(drafter), candidates=self.candidates)

    def time(self, drafter: str, proposer: Proposer) -> Proposer:
        """Have `proposer` (the drafter called `drafter`, new: its estimate starts again) feed its cost estimate
        from its proposals; returns it."""
        cost = self.cost_of(drafter)
        cost.reset()
        propose = proposer.propose

        @functools.wraps(propose)
        def timed(requests: list[DraftRequest]) -> list[Draft]:
            t0 = time.perf_counter()
            drafts = propose(requests)
            if any(d.tokens for d in drafts):  # not a call that failed (e.g. a timed-out actor) or found nothing
                cost.observe(time.perf_counter() - t0, sum(1 for r in requests if r.k > 0))
            return drafts

        proposer.propose = timed
        return proposer


_STEP_TIMES: dict[tuple, StepTimes] = {}


def cached_step_times(key: tuple, measure: Callable[[], StepTimes]) -> StepTimes:
    """The target's step times, measured once per process for each `key` (model, dtype, device, kernels...)."""
    if key not in _STEP_TIMES:
        _STEP_TIMES[key] = measure()
    return _STEP_TIMES[key]
