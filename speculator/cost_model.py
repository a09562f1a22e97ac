"""Speculate only where it pays: per sequence and step, the draft length k (and candidate count) that maximizes
expected tokens per second, from the target's measured step time by verified rows, the drafter's cost and the
sequence's recent acceptance by position.

With alpha_i the probability that draft position i is accepted given position i-1 was, a step with k drafts
emits E(k) = 1 + sum_{i<=k} prod_{j<=i} alpha_j tokens and takes step(rows + k * candidates) + draft cost. k = 0
(no speculation) is always a choice, and wins whenever drafts do not pay for the rows they add.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.runner import ModelRunner, StepInput


@dataclass(frozen=True)
class StepTimes:
    """The target's step time (seconds) by rows verified in the step; linear between the measured points and
    along the last segment beyond them. Times must not decrease with rows (`measure_step_times` makes them so:
    more rows never make a step cheaper, whatever the noise of one run said)."""

    rows: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.seconds) or not self.rows:
            raise ValueError("need one time per row count, at least one")
        if any(b <= a for a, b in zip(self.rows, self.rows[1:])) or self.rows[0] < 1:
            raise ValueError(f"row counts must increase from >= 1, got {self.rows}")
        if self.seconds[0] <= 0 or any(b < a for a, b in zip(self.seconds, self.seconds[1:])):
            raise ValueError(f"step times must be positive and not decrease with rows, got {self.seconds}")

    def at(self, rows: float) -> float:
        r, s = self.rows, self.seconds
        if len(r) == 1 or rows <= r[0]:
            return s[0]
        i = min(max(bisect_left(r, rows), 1), len(r) - 1)
        slope = (s[i] - s[i - 1]) / (r[i] - r[i - 1])
        return s[i - 1] + slope * (rows - r[i - 1])


@dataclass
class SeqAcceptance:
    """A sequence's recent acceptance by position, per candidate count: the mean of "accepted given the previous
    position was" over the steps that tried the position, the prior counted as one of them, and once that mean
    weighs a step less than `1 - decay`, an exponentially weighted mean. So a few misses already pull a new
    sequence's estimate well below the prior, and later it follows the recent steps."""

    prior: float = 0.5
    decay: float = 0.9
    by_candidates: dict[int, list[float]] = field(default_factory=dict)
    tries: dict[int, list[int]] = field(default_factory=dict)  # steps that tried each position, per candidates
    steps_without_draft: int = 0

    def alphas(self, k: int, candidates: int = 1) -> list[float]:
        known = self.by_candidates.get(candidates, [])
        return known[:k] + [self.prior] * max(0, k - len(known))

    def run_alphas(self, k: int) -> list[float]:
        """`alphas` of one chain where positions never tried go on at the last tried one's rate (a run of accepted
        drafts is expected to go on as it has): what k may grow into, not only what it has tried."""
        known = self.by_candidates.get(1, [])
        return known[:k] + [known[-1] if known else self.prior] * max(0, k - len(known))

    def update(self, drafted: int, accepted: int, candidates: int = 1) -> None:
        """A step verified `drafted` tokens (the longest chain, with several candidates) and kept `accepted`."""
        if drafted <= 0:
            self.steps_without_draft += 1
            return
        self.steps_without_draft = 0
        curve = self.by_candidates.setdefault(candidates, [])
        tries = self.tries.setdefault(candidates, [])
        tried = min(accepted + 1, drafted)  # positions 0..accepted were tried; those before `accepted` passed
        if len(curve) < tried:
            curve.extend([self.prior] * (tried - len(curve)))
            tries.extend([0] * (tried - len(tries)))
        for j in range(tried):
            tries[j] += 1
            weight = max(1 - self.decay, 1 / (tries[j] + 1))
            curve[j] += weight * ((1.0 if j < accepted else 0.0) - curve[j])


def expected_tokens(alphas: Sequence[float]) -> float:
    """1 + sum over i of prod_{j<=i} alpha_j: tokens a step emits with these drafts (the bonus included)."""
    total, survive = 1.0, 1.0
    for a in alphas:
        survive *= a
        total += survive
    return total


@dataclass(frozen=True)
class Plan:
    k: int
    candidates: int = 1
    tokens_per_second: float = 0.0
    probe: bool = False  # k = 1 only to learn whether drafts land again


@dataclass
class CostModel:
    """`choose` per sequence and step. `draft_seconds_per_token` is the drafter's cost per proposed token
    (measure it with `measure_draft_cost`; about 0 for n-gram and suffix lookup), `draft_seconds_per_call` its
    fixed cost per proposal. A sequence at k = 0 for `probe_interval` steps is offered k = 1 once."""

    step: StepTimes
    k_max: int
    draft_seconds_per_token: float = 0.0
    draft_seconds_per_call: float = 0.0
    probe_interval: int = 32
    min_gain: float = 0.02  # speculate only when its rate beats k = 0 by this fraction

    def rate(
        self,
        alphas: Sequence[float],
        batch_rows: int,
        candidates: int = 1,
        batch_tokens: float = 0.0,
        draft_seconds: float | None = None,
    ) -> float:
        """Tokens per second of a step with this sequence drafting len(alphas) tokens; `draft_seconds` is what its
        drafting costs (default: `draft_seconds_per_call` and `draft_seconds_per_token` for each token)."""
        k = len(alphas)
        seconds = self.step.at(batch_rows + 1 + k * candidates)
        if k:
            if draft_seconds is None:
                draft_seconds = self.draft_seconds_per_call + self.draft_seconds_per_token * k * candidates
            seconds += draft_seconds
        return (batch_tokens + expected_tokens(alphas)) / seconds

    def choose(self, seq: SeqAcceptance, batch_rows: int, batch_tokens: float = 0.0) -> Plan:
        """The best plan for a sequence that the rest of the step already gives `batch_rows` verified rows
        (its own first row not included). The rate maximized is this sequence's tokens per second, or with
        `batch_tokens` (what the rest of the step is expected to emit) the whole step's."""
        best = Plan(0, 1, self.rate([], batch_rows, 1, batch_tokens))
        for candidates in sorted(seq.by_candidates) or [1]:
            plan = self.best_k(seq.alphas(self.k_max, candidates), batch_rows, batch_tokens, candidates)
            if plan.tokens_per_second > best.tokens_per_second:
                best = plan
        if best.k == 0 and self.probe_due(seq.steps_without_draft):
            return Plan(1, 1, self.rate(seq.alphas(1), batch_rows, 1, batch_tokens), probe=True)
        return best

    def probe_due(self, steps_at_zero: int) -> bool:
        """Whether a sequence left at k = 0 that many steps is offered k = 1, to learn whether drafts land again."""
        return self.k_max > 0 and steps_at_zero >= self.probe_interval

    def best_k(
        self,
        alphas: Sequence[float],
        batch_rows: int,
        batch_tokens: float = 0.0,
        candidates: int = 1,
        draft_seconds: float | None = None,
    ) -> Plan:
        """The k (up to len(alphas)) of the highest rate for these acceptances, 0 unless a draft beats it by
        `min_gain`; `draft_seconds` as in `rate`."""
        best = Plan(0, 1, self.rate([], batch_rows, 1, batch_tokens))
        floor = best.tokens_per_second * (1 + self.min_gain)
        for k in range(1, len(alphas) + 1):
            r = self.rate(alphas[:k], batch_rows, candidates, batch_tokens, draft_seconds)
            if r > max(floor, best.tokens_per_second):
                best = Plan(k, candidates, r)
        return best


# ---- start-up measurement ---------------------------------------------------------------------------------


def measure_step_times(
    runner: ModelRunner,
    rows: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 16, 32),
    *,
    rows_per_seq: int = 4,
    context: int = 128,
    repeats: int = 3,
) -> StepTimes:
    """Time the runner's forward at each row count: sequences of `rows_per_seq` verified rows (a decode row and
    its drafts) over `context` tokens of KV each, the fastest of `repeats` rounds after a warm-up. Every row count
    a single sequence verifies at small k is measured: the CPU kernels take 1 row and 2-5 rows by different
    paths, so a line from 1 to 4 rows put 2 rows about 7% too cheap and k = 1 looked as if it paid.

    It writes K/V into the pool's blocks from block 1 on: run it before the runner serves requests."""
    bs = runner.block_size
    blocks_per_seq = -(-(context + rows_per_seq) // bs)

    def items(n_rows: int) -> list[StepInput]:
        out = []
        for i in range(-(-n_rows // rows_per_seq)):
            q = min(rows_per_seq, n_rows - i * rows_per_seq)
            first = 1 + (i * blocks_per_seq) % max(1, runner.num_blocks - 1 - blocks_per_seq)
            table = list(range(first, first + blocks_per_seq))
            out.append(StepInput([0] * q, context, table, q))
        return out

    if blocks_per_seq + 1 > runner.num_blocks:
        raise ValueError(f"a context of {context} tokens does not fit the runner's {runner.num_blocks} blocks")
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    for n in (rows[0], rows[-1]):  # warm-up: the smallest and the largest shapes
        runner.execute(items(n))
    sync()
    batches = [items(n) for n in rows]
    seconds = [float("inf")] * len(rows)
    for _ in range(repeats):  # rounds over all row counts: a slow spell of the machine hits one round, not a size
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            runner.execute(batch)
            sync()
            seconds[i] = min(seconds[i], time.perf_counter() - t0)
    # Not decreasing with rows: a slow outlier at few rows is cut to what more rows took, not carried forward.
    for i in range(len(seconds) - 2, -1, -1):
        seconds[i] = min(seconds[i], seconds[i + 1])
    return StepTimes(tuple(rows), tuple(seconds))


def measure_draft_cost(propose, requests, repeats: int = 3) -> float:
    """Seconds per proposed token of `propose(requests)` (a Proposer's propose), the fastest of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        drafts = propose(requests)
        best = min(best, time.perf_counter() - t0)
    return best / max(1, sum(len(d.tokens) for d in drafts))
