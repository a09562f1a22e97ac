"""The proposer an engine config names, built the same way wherever it runs (in the engine's process or in the
draft worker actor), and what a replica must know of it without building it (for a proposer in an actor)."""

from __future__ import annotations

from pathlib import Path

import torch

from model.config import EngineConfig
from model.cpu_kernels import load_kernels
from model.decoder import CausalLM
from model.loader import load_arch, resolve_model
from model.runner import ModelRunner
from speculator.adaptation import write_files
from speculator.draft_model import DraftModelProposer
from speculator.eagle import EagleHead, EagleLoadError, TargetParts, load_eagle, read_eagle_config
from speculator.eagle_proposer import EagleProposer
from speculator.mlp_checkpoint import read_config
from speculator.mlp_proposer import MLPProposer
from speculator.mlp_speculator import MLPSpeculator
from speculator.ngram import NgramProposer
from speculator.plan import WorkloadPlan, drafter_kind, read_plan
from speculator.proposer import HiddenRows, Proposer
from speculator.routed import RoutedProposer
from speculator.suffix import SuffixProposer


def make_proposer(
    config: EngineConfig, *, device: torch.device | str | None = None, target: CausalLM | None = None
) -> Proposer | None:
    """The proposer of `config.speculator` (None for "none"); `device` overrides `config.device` (an actor sees
    its GPU as cuda:0). An EAGLE head borrows the target's embedding and LM head: from `target` (the engine's
    own model) or, in a process without one (the draft worker), from a one-layer load of the target's weights.
    A drafter folder that does not fit the target is a one-line ValueError."""
    device = device if device is not None else config.device
    if config.speculator == "auto":
        return make_routed_proposer(config, read_plan(config.plan) if config.plan else None, device, target)
    if config.speculator == "ngram":
        return NgramProposer(config.ngram_min, config.ngram_max)
    if config.speculator == "suffix":
        return SuffixProposer()
    if config.speculator == "draft":
        return DraftModelProposer(ModelRunner.from_config(config, draft=True, device=device))
    if config.speculator == "mlp":
        arch = load_arch(resolve_model(config.model))
        proposer = MLPProposer.load(
            config.speculator_model,
            target_hidden_size=arch.hidden_size,
            target_vocab_size=arch.vocab_size,
            device=device,
            dtype=getattr(torch, config.dtype),
        )
        quantize_for_drafting(proposer.model, config, device)
        return proposer
    if config.speculator == "eagle":
        if target is None:
            one_layer = config.model_copy(update={"draft_model": None, "draft_num_layers": 1})
            target = ModelRunner.from_config(one_layer, draft=True, device=device).model
        parts = TargetParts.from_model(target)
        try:
            head = load_eagle(config.speculator_model, parts, device=device, dtype=parts.embed.dtype)
        except EagleLoadError as e:
            raise ValueError(str(e)) from None
        quantize_for_drafting(head, config, device)
        return EagleProposer(head)
    return None


def quantize_for_drafting(drafter: EagleHead | MLPSpeculator, config: EngineConfig, device: torch.device | str) -> bool:
    """Whether the learned `drafter` now drafts with int8 matrices: on CPU in float32 with the kernels built,
    unless `weights: fp32` asks for float32 throughout. A draft step reads a quarter of the bytes; drafts never
    change the output."""
    usable = torch.device(device).type == "cpu" and config.dtype == "float32" and config.cpu_kernels
    if not usable or config.weights == "fp32" or (kernels := load_kernels(required=False)) is None:
        return False
    return drafter.quantize_int8(kernels) > 0


MODEL_BACKED = ("draft", "mlp", "eagle")  # the drafters a draft worker actor hosts; n-gram and suffix lookups never


def make_routed_proposer(
    config: EngineConfig, plan: WorkloadPlan | None, device: torch.device | str, target: CausalLM | None
) -> RoutedProposer:
    """`speculator: auto`: every drafter the plan's classes use, built as `make_proposer` builds it alone."""
    configs = plan_drafters(config, plan)
    drafters = {name: make_proposer(one, device=device, target=target) for name, one in configs.items()}
    return RoutedProposer(drafters, default=next(iter(drafters)))


def plan_drafters(config: EngineConfig, plan: WorkloadPlan | None) -> dict[str, EngineConfig]:
    """The drafters of `speculator: auto` by name, each as the config of `make_proposer` alone, the default one
    first (n-gram for every request without a plan, or when no class drafts); a per-class learned drafter
    ("mlp:class0") is its kind over its own folder."""
    names = plan.drafters_used() if plan else []
    out = {}
    for name in names or ["ngram"]:
        folder = plan.drafter_models.get(name) if plan else None
        update = {"speculator": drafter_kind(name), "plan": None, "speculator_model": folder}
        out[name] = EngineConfig(**{**config.model_dump(), **update})
    return out


def drafter_configs(config: EngineConfig) -> dict[str, EngineConfig]:
    """Every drafter `make_proposer(config)` builds, by name, as a config of its own: the plan's under
    `speculator: auto`, else the one `config.speculator` names (none for "none")."""
    if config.speculator == "auto":
        return plan_drafters(config, read_plan(config.plan) if config.plan else None)
    return {config.speculator: config} if config.speculator != "none" else {}


def released_drafter(
    config: EngineConfig, files: dict[str, bytes], folder: Path, *, device: torch.device | str | None = None
) -> MLPProposer:
    """An adapted drafter released by the optimizer (its folder's `files`, written to `folder`), built for
    `config`'s target as `make_proposer` builds a learned drafter; the replica or its draft worker runs it."""
    write_files(files, folder)
    one = config.model_copy(update={"speculator": "mlp", "plan": None, "speculator_model": str(folder)})
    return make_proposer(one, device=device)


def proposer_traits(config: EngineConfig) -> tuple[HiddenRows, int | None]:
    """`hidden_rows` and `max_k` of the proposer `make_proposer(config)` builds, read without loading it (the
    replica's stand-in for a proposer in the draft worker actor must declare them)."""
    if config.speculator == "mlp":
        return MLPProposer.hidden_rows, read_config(config.speculator_model).n_predict
    if config.speculator == "eagle":
        try:
            head = read_eagle_config(config.speculator_model)  # fails early on a folder that is not a head
        except EagleLoadError as e:
            raise ValueError(str(e)) from None
        return EagleProposer.hidden_rows, head.draft_steps  # None (an older head): any k
    return "none", None
