"""How many tokens each sequence drafts per step: the backoff controller (speculator/backoff.py) or the cost model
(speculator/k_policy.py), which weighs a sequence's k against the rest of the batch."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from engine.workload_routing import Route
from model.config import EngineConfig
from model.runner import ModelRunner
from speculator.backoff import KController
from speculator.cost_model import StepTimes, measure_step_times
from speculator.k_policy import CostKController, CostPolicy, cached_step_times
from speculator.routed import RoutedProposer

if TYPE_CHECKING:
    from engine.request_state import RequestState

log = logging.getLogger("engine.llm_engine")


class SpeculationLength:
    """Mixin of LLMEngine: the k controller of a new sequence and its k at each step."""

    config: EngineConfig

    def _make_k_policy(self, step: StepTimes | None) -> CostPolicy | None:
        """The speculation cost model, over the target's step time by rows measured here once per process
        (before any request); None (the backoff controller) when not asked for or when the runner cannot be
        timed here (e.g. tensor-parallel shards)."""
        cfg = self.config
        if not (
            self.proposer and cfg.adaptive_k and cfg.k_policy_in_use == "cost" and isinstance(self.runner, ModelRunner)
        ):
            return None
        key = (str(self.folder), cfg.dtype, str(self.runner.device), cfg.attention_backend, cfg.cpu_kernels)
        context = min(128, self.max_model_len - 8)
        try:
            step = step or cached_step_times(key, lambda: measure_step_times(self.runner, context=context))
        except ValueError as e:  # a KV pool too small to time a batch: keep the backoff
            log.warning("speculation cost model off (%s); backing k off on misses instead", e)
            return None
        log.info("target step seconds by verified rows: %s", dict(zip(step.rows, step.seconds)))
        policy = CostPolicy(step, cfg.num_speculative_tokens, candidates=self.scheduler.num_candidates)
        # each drafter's cost, from its proposals
        drafters = (
            self.proposer.proposers if isinstance(self.proposer, RoutedProposer) else {cfg.speculator: self.proposer}
        )
        for name, proposer in drafters.items():
            policy.time(name, proposer)
        return policy

    def _make_controller(self, route: Route | None = None, drafter: str | None = None) -> KController | CostKController:
        """A sequence's k controller; with `route` (speculator auto) starting from its class's k, and under the
        cost model from its class's measured acceptance; for its drafter (route's, else `drafter`, else the
        engine's one)."""
        if self.k_policy:
            name = route.drafter if route is not None else drafter or self.config.speculator
            controller = self.k_policy.controller(name, route.k if route is not None else None)
            if route is not None and route.alphas:
                controller.seed(list(route.alphas))
            return controller
        if route is not None:
            controller = KController(self.config.num_speculative_tokens, k=route.k)
        else:
            controller = KController(self.config.num_speculative_tokens)
        if not self.config.adaptive_k:
            controller.patience = 1 << 30
        return controller

    def _next_k(self, req: RequestState) -> int:
        """The sequence's k for its next step; the cost model weighs it against the rest of the batch: the rows
        the other running sequences verify (a decode row and its k, or a prefill chunk) and the tokens they are
        expected to emit."""
        if not isinstance(req.controller, CostKController):
            return req.controller.next_k()
        rows, tokens = 0, 0.0
        for seq in self.scheduler.running:
            other = self.requests.get(seq.request_id)
            if seq is req.seq or other is None:
                continue
            if seq.is_decoding:
                rows += self.scheduler.verified_rows(seq)
                tokens += other.controller.tokens if isinstance(other.controller, CostKController) else 1.0
            else:
                rows += min(seq.num_uncomputed, self.config.max_num_batched_tokens)
        return req.controller.next_k(rows, tokens)
