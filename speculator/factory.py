"""The proposer an engine config names, built the same way wherever it runs (in the engine's process or in the
draft worker actor), and what a replica must know of it without building it (for a proposer in an actor)."""

from __future__ import annotations

import torch

from model.config import EngineConfig
from model.loader import load_arch, resolve_model
from model.runner import ModelRunner
from speculator.draft_model import DraftModelProposer
from speculator.mlp_checkpoint import read_config
from speculator.mlp_proposer import MLPProposer
from speculator.ngram import NgramProposer
from speculator.proposer import HiddenRows, Proposer

EAGLE_NOT_AVAILABLE = "speculator 'eagle' is not available yet"


def make_proposer(config: EngineConfig, *, device: torch.device | str | None = None) -> Proposer | None:
    """The proposer of `config.speculator` (None for "none"); `device` overrides `config.device` (an actor sees
    its GPU as cuda:0). A drafter folder that does not fit the target is a one-line ValueError."""
    device = device if device is not None else config.device
    if config.speculator == "ngram":
        return NgramProposer(config.ngram_min, config.ngram_max)
    if config.speculator == "draft":
        return DraftModelProposer(ModelRunner.from_config(config, draft=True, device=device))
    if config.speculator == "mlp":
        arch = load_arch(resolve_model(config.model))
        return MLPProposer.load(
            config.speculator_model,
            target_hidden_size=arch.hidden_size,
            target_vocab_size=arch.vocab_size,
            device=device,
            dtype=getattr(torch, config.dtype),
        )
    if config.speculator == "eagle":
        raise ValueError(EAGLE_NOT_AVAILABLE)
    return None


def proposer_traits(config: EngineConfig) -> tuple[HiddenRows, int | None]:
    """`hidden_rows` and `max_k` of the proposer `make_proposer(config)` builds, read without loading it (the
    replica's stand-in for a proposer in the draft worker actor must declare them)."""
    if config.speculator == "mlp":
        return MLPProposer.hidden_rows, read_config(config.speculator_model).n_predict
    if config.speculator == "eagle":
        raise ValueError(EAGLE_NOT_AVAILABLE)
    return "none", None
