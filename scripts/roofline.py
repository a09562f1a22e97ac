"""What a decode step must read, and how fast this machine reads: the roofline of a memory-bound step.

A decode step of a small model reads every weight once (linear layers and the LM head, as stored: float32 or
GGUF blocks; plus one embedding row a token) and the K/V of every context token of every sequence; dividing
those bytes by the step time gives the achieved read rate, to be set against the machine's measured one.
"""

from __future__ import annotations

import time

import torch

from engine.llm_engine import LLMEngine


def read_bandwidth_gb_per_s(gib: float = 1.0, repeats: int = 5) -> float:
    """Streaming-read rate of this process's torch threads: a sum over a `gib` GiB float32 array, the best of
    `repeats` (the first pass also faults the pages in)."""
    data = torch.ones(int(gib * (1 << 30)) // 4)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def weight_bytes(engine: LLMEngine) -> int:
    """Bytes of the matrices one decode step reads: each linear layer's packed blocks or float32 weight, and
    the LM head's."""
    total = 0
    for module in engine.runner.model.modules():
        if hasattr(module, "quant"):
            total += module.quant.nbytes if module.quant is not None else module.weight.numel() * 4
    return total


def embedding_row_bytes(engine: LLMEngine) -> int:
    """Bytes of one token's embedding row (the lookup reads one a token)."""
    table = engine.runner.model.embed.weight
    return table.shape[1] * table.element_size()


def kv_bytes_per_token(engine: LLMEngine) -> int:
    """Bytes of K and V of one context token over all layers (what attention reads per token of context)."""
    data = engine.runner.kv.data  # [layers, 2, blocks, block_size, kv_heads, head_dim]
    return data[:, :, 0, 0].numel() * data.element_size()


def roofline(weight_bytes_per_step: float, kv_bytes_per_step: float, steps_per_s: float, bandwidth: float) -> dict:
    """Bytes a step reads, the rate that makes at `steps_per_s`, and its share of the measured bandwidth."""
    total = weight_bytes_per_step + kv_bytes_per_step
    achieved = total * steps_per_s / 1e9
    return {
        "weight_bytes_per_step": round(weight_bytes_per_step),
        "kv_bytes_per_step": round(kv_bytes_per_step),
        "bytes_per_step": round(total),
        "achieved_gb_per_s": round(achieved, 2),
        "of_read_bandwidth": round(achieved / bandwidth, 3),
    }
