"""Runs one forward step of a model over its paged KV pages: builds the flat batch, returns the wanted logits
(and, for learned drafters, the final hidden states of the rows they read, from the same forward).

`ModelRunner.from_config` is the one way to build a runner from the engine settings, in every process that needs
one (the engine, the draft worker actor, each tensor-parallel shard actor): they must all load the same model the
same way, or remote drafting and sharded forwards would not reproduce the in-process ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.attention.backends import make_backend
from model.attention.paged import padded_tables
from model.attention.tree import tree_depths
from model.config import EngineConfig
from model.cpu_kernels import load_kernels
from model.decoder import CausalLM
from model.gguf_weights import is_quantized, read_packed
from model.kv_pages import KVPages, SlotMove, path_slots
from model.loader import ModelArch, ModelLoadError, load_arch, model_source, resolve_model
from model.parallel import ParallelContext, rank_kv_cache_bytes
from model.quant import PackedWeight
from model.quant_gemm_rows import tune_gemm_rows


@dataclass
class StepInput:
    """One sequence's share of a step: feed `token_ids` at positions start.., want the last `num_logits` rows'
    logits and the last `num_hidden` rows' final hidden states (after the last norm, before the LM head).

    With `tree_parents` the tokens are a token tree (`model.attention.tree`): token i still goes to slot
    start + i, but is rotated at position start + depth(i) and attends to its ancestors only."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    num_logits: int
    num_hidden: int = 0
    tree_parents: list[int] | None = None


@dataclass
class StepOutput:
    """A step's results in item order: logits [sum(num_logits), vocab] float32, hidden [sum(num_hidden),
    hidden_size] in the model's dtype (None when no item asked for hidden states)."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None


def packed_weights(
    config: EngineConfig, model: str | None, arch: ModelArch, num_layers: int | None
) -> dict[str, PackedWeight] | None:
    """The quantized matrices to run packed for `config.weights` (None: float32 weights). auto packs a quantized
    GGUF on CPU in float32 when the kernels build; packed insists (and fails without the kernels)."""
    if config.weights == "fp32" or config.quantization == "int8":
        return None
    source = model_source(model)
    if config.weights == "auto":
        usable = config.device == "cpu" and config.dtype == "float32" and config.cpu_kernels
        if not (usable and source.suffix == ".gguf" and is_quantized(source)) or load_kernels(required=False) is None:
            return None
    elif source.suffix != ".gguf":
        raise ModelLoadError(f"weights: packed needs a quantized .gguf model, not the folder {source}")
    packed = read_packed(source, arch, num_layers)
    if not packed:
        raise ModelLoadError(f"weights: packed, but {source.name} has no Q4_0 / Q4_1 / Q8_0 matrices")
    return packed


def context_length(config: EngineConfig, arch: ModelArch) -> int:
    """The context the engine serves (prompt + output): `config.max_model_len`, capped at the model's own."""
    return min(config.max_model_len or arch.max_model_len, arch.max_model_len)


class ModelRunner:
    def __init__(
        self,
        folder: Path,
        arch: ModelArch,
        *,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        kv_cache_bytes: int,
        max_model_len: int,
        tp: ParallelContext | None = None,
        num_layers: int | None = None,
        attention_backend: str = "auto",
        cpu_kernels: bool = True,
        packed: dict[str, PackedWeight] | None = None,
        quantization: str = "none",
    ):
        self.tp = tp or ParallelContext()
        self.device, self.dtype, self.block_size = device, dtype, block_size
        int8 = quantization == "int8"
        if (packed or int8) and (device.type != "cpu" or dtype != torch.float32 or not cpu_kernels):
            raise ValueError("packed and int8 weights run on CPU in float32 with the CPU kernels")
        with torch.device(device):
            self.model = CausalLM(arch, self.tp, num_layers).to(dtype)
        self.model.load(folder, max_model_len, packed)
        if int8:
            self.model.quantize_int8()
        self.packed = bool(packed) or int8  # whether the linear layers run on blocks (GGUF's, or int8 ones)
        layer = self.model.layers[0]
        n_layers = len(self.model.layers)
        num_blocks = KVPages.blocks_for_budget(
            kv_cache_bytes, n_layers, block_size, layer.num_kv_heads, arch.head_dim, dtype
        )
        if num_blocks < 2:
            raise ValueError(f"kv cache budget of {kv_cache_bytes} bytes holds fewer than 2 blocks")
        self.kv = KVPages(n_layers, num_blocks, block_size, layer.num_kv_heads, arch.head_dim, dtype, device)
        kernels = None
        if device.type == "cpu" and cpu_kernels:
            kernels = load_kernels(required=attention_backend == "cpu" or self.packed)
        self.backend = make_backend(attention_backend, block_size, device, kernels)
        if kernels is not None and dtype == torch.float32:
            self.model.use_cpu_kernels(kernels)
            if self.packed:
                tune_gemm_rows(kernels, self.model.packed_matrices())

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        *,
        draft: bool = False,
        device: torch.device | str | None = None,
        tp: ParallelContext | None = None,
    ) -> ModelRunner:
        """The target's runner for `config`, or with `draft` the draft's: `config.draft_model` (None = the
        target's weights) cut to `draft_num_layers`, with KV pages of `draft_kv_cache_gib`, at the target's
        context length. `device` overrides `config.device` (an actor sees its GPU as cuda:0); `tp` builds one
        tensor-parallel rank, whose share of the per-device KV budget gives every rank the same block count.

        Raises ModelLoadError when the draft's vocabulary differs from the target's (its tokens would be
        meaningless to the verifier) and ValueError when the layer cut exceeds the draft's depth, both before
        any weights are loaded."""
        tp = tp or ParallelContext()
        folder = resolve_model(config.model)
        arch = load_arch(folder)
        max_model_len = context_length(config, arch)
        kv_cache_gib, num_layers, model = config.kv_cache_gib, None, config.model
        if draft:
            target_vocab_size = arch.vocab_size
            model = config.draft_model or config.model
            folder = resolve_model(model)
            arch = load_arch(folder)
            if arch.vocab_size != target_vocab_size:
                raise ModelLoadError(f"draft vocab {arch.vocab_size} != target vocab {target_vocab_size}")
            if config.draft_num_layers and config.draft_num_layers > arch.num_layers:
                raise ValueError(f"draft_num_layers={config.draft_num_layers} > the draft's {arch.num_layers} layers")
            kv_cache_gib, num_layers = config.draft_kv_cache_gib, config.draft_num_layers
        return cls(
            folder,
            arch,
            dtype=getattr(torch, config.dtype),
            device=torch.device(device if device is not None else config.device),
            block_size=config.block_size,
            kv_cache_bytes=rank_kv_cache_bytes(int(kv_cache_gib * (1 << 30)), arch.num_kv_heads, tp),
            max_model_len=max_model_len,
            tp=tp,
            num_layers=num_layers,
            attention_backend=config.attention_backend,
            cpu_kernels=config.cpu_kernels,
            packed=packed_weights(config, model, arch, num_layers),
            quantization=config.quantization,
        )

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    def execute(self, items: list[StepInput]) -> torch.Tensor:
        """Forward the batch; logits [sum(num_logits), vocab] float32, in item order."""
        return self.execute_with_hidden(items).logits

    def execute_with_hidden(self, items: list[StepInput]) -> StepOutput:
        """Forward the batch; the wanted logits and final hidden states, both in item order."""
        bs = self.block_size
        q_lens = [len(it.token_ids) for it in items]
        seq_lens = [it.start + n for it, n in zip(items, q_lens)]
        ids = np.fromiter((t for it in items for t in it.token_ids), dtype=np.int64, count=sum(q_lens))
        positions = np.concatenate([np.arange(it.start, it.start + n) for it, n in zip(items, q_lens)])
        tables = [it.block_table for it in items]
        seq_index = np.repeat(np.arange(len(items)), q_lens)
        flat = padded_tables(tables, max(-(-n // bs) for n in seq_lens))
        slots = flat[seq_index, positions // bs] * bs + positions % bs
        trees = [it.tree_parents for it in items]
        if any(t is not None for t in trees):  # tree nodes are rotated at their depth, not their slot
            for it, n, end in zip(items, q_lens, np.cumsum(q_lens)):
                if it.tree_parents is not None:
                    positions[end - n : end] = it.start + tree_depths(it.tree_parents)
        else:
            trees = None
        meta = self.backend.prepare(q_lens, seq_lens, tables, slots, trees)
        ends = np.cumsum(q_lens)
        rows = np.concatenate([np.arange(e - it.num_logits, e) for it, e in zip(items, ends)])
        hidden = self.model(
            torch.from_numpy(ids).to(self.device),
            torch.from_numpy(positions).to(self.device),
            self.kv,
            meta,
            self.backend,
        )
        logits = self.model.logits(hidden[torch.from_numpy(rows).to(self.device)])
        if not any(it.num_hidden for it in items):
            return StepOutput(logits)
        hidden_rows = np.concatenate([np.arange(e - it.num_hidden, e) for it, e in zip(items, ends)])
        return StepOutput(logits, hidden[torch.from_numpy(hidden_rows).to(self.device)])

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.kv.copy_blocks(pairs)

    def move_slots(self, moves: list[SlotMove]) -> None:
        """Compacts verified tree paths: each sequence's accepted nodes' K/V into consecutive slots."""
        self.kv.move_slots(*path_slots(moves, self.block_size))
