"""`speculator: auto`: a request's workload class from its prompt token ids, and that class's drafter and
starting k (speculator/plan.py). Without a plan every request starts with the cheapest drafter, n-gram lookup."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.spec_monitor import DEFAULT_CLASS
from model.config import EngineConfig
from speculator.plan import NONE, WorkloadPlan, alphas_from_survival, read_plan
from speculator.proposer import Proposer
from speculator.routed import RoutedProposer
from speculator.workload_class import PromptClassifier, embedding_table


@dataclass(frozen=True)
class Route:
    workload_class: str | None
    drafter: str  # "none": the request never drafts
    k: int  # the k it starts from (the k policy adapts it live)
    alphas: list[float] | None = None  # the class's measured acceptance by position, a cost-model prior


class WorkloadRouter:
    def __init__(
        self,
        plan: WorkloadPlan | None,
        k_max: int,
        table: Callable[[], torch.Tensor],
        decode: Callable[[list[int]], str],
        default: str = "ngram",
    ):
        self.plan = plan
        self.k_max = k_max
        self.default = default
        self.classifier = None
        self.assigned: dict[str, str] = {}  # class -> drafter swapped in live (adaptation), over the plan's
        if plan is not None:
            needs_table = plan.classifier.kind == "kmeans"
            self.classifier = PromptClassifier(plan.classifier, table() if needs_table else None, decode)

    def assign(self, workload_class: str, drafter: str | None) -> None:
        """Route the class's new requests to `drafter` from now on; None = back to the plan's choice."""
        if drafter is None:
            self.assigned.pop(workload_class, None)
        else:
            self.assigned[workload_class] = drafter

    def route(self, token_ids: list[int]) -> Route:
        name = self.classifier.classify(token_ids) if self.classifier is not None else DEFAULT_CLASS
        if name in self.assigned:
            return Route(name, self.assigned[name], self.k_max)
        if self.classifier is None:
            return Route(name, self.default, self.k_max)
        choice = self.plan.choice(name)
        if choice.drafter == NONE or choice.k == 0:
            return Route(name, NONE, 0)
        acceptance = (
            self.plan.drafters[choice.drafter].by_class.get(name) if choice.drafter in self.plan.drafters else None
        )
        alphas = alphas_from_survival(acceptance.survival)[: self.k_max] if acceptance else None
        return Route(name, choice.drafter, min(choice.k, self.k_max), alphas)


def make_router(
    config: EngineConfig, proposer: Proposer | None, runner: Any, folder: Path, vocab_size: int, tokenizer: Any
) -> WorkloadRouter | None:
    """The engine's router under `speculator: auto` (None otherwise): the embedding table is the loaded target's,
    or read from its weights where the runner holds no model (tensor-parallel shards)."""
    if config.speculator != "auto" or not isinstance(proposer, RoutedProposer):
        return None
    plan = read_plan(config.plan) if config.plan else None
    model = getattr(runner, "model", None)

    def table() -> torch.Tensor:
        if model is not None:
            return model.embed.weight.detach()[:vocab_size].float()
        return embedding_table(folder)

    return WorkloadRouter(plan, config.num_speculative_tokens, table, tokenizer.decode, proposer.default)
