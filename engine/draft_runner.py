"""Builds the draft model's runner from the engine settings, in one place for every host.

The engine builds it in-process and the draft worker actor builds it in its own process; both must load the
same draft (same folder, layer cut, dtype, block size and context length), or remote drafting would not
reproduce in-process drafting.
"""

from __future__ import annotations

import torch

from engine.config import EngineConfig
from engine.loader import ModelLoadError, load_arch, resolve_model
from engine.model_runner import ModelRunner


def build_draft_runner(
    config: EngineConfig,
    target_vocab_size: int,
    max_model_len: int,
    *,
    device: torch.device | str | None = None,
) -> ModelRunner:
    """The draft's runner: `config.draft_model` (None = the target's own weights) cut to `draft_num_layers`,
    with a KV pool of `draft_kv_cache_gib`. `device` overrides `config.device` (an actor sees its GPU as 0).

    Raises ModelLoadError when the draft's vocabulary differs from the target's (its tokens would be
    meaningless to the verifier) and ValueError when the layer cut exceeds the draft's depth."""
    folder = resolve_model(config.draft_model if config.draft_model else config.model)
    arch = load_arch(folder)
    if arch.vocab_size != target_vocab_size:
        raise ModelLoadError(f"draft vocab {arch.vocab_size} != target vocab {target_vocab_size}")
    if config.draft_num_layers and config.draft_num_layers > arch.num_layers:
        raise ValueError(f"draft_num_layers={config.draft_num_layers} > the draft's {arch.num_layers} layers")
    return ModelRunner(
        folder,
        arch,
        dtype=getattr(torch, config.dtype),
        device=torch.device(device if device is not None else config.device),
        block_size=config.block_size,
        kv_cache_bytes=int(config.draft_kv_cache_gib * (1 << 30)),
        max_model_len=max_model_len,
        num_layers=config.draft_num_layers,
        attention_backend=config.attention_backend,
        cpu_kernels=config.cpu_kernels,
    )
