"""Paged attention behind one interface.

The model calls `backend.prepare(...)` once per step and `backend.forward(...)` once per layer; the scheduler
and the model never see how K/V are laid out. `TorchPagedAttention` is pure PyTorch and runs on any device:
it writes the step's K/V into the pool through the slot mapping, gathers each sequence's pages through its
block table and calls `scaled_dot_product_attention` with a mask that is causal inside the new tokens and
open to the whole cached context (bottom-right aligned, as speculative verification needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AttnMetadata:
    """Per-step layout of the flattened batch: T new tokens belonging to B sequences."""

    slot_mapping: torch.Tensor  # [T] int64: pool slot each new token's K/V is written to
    block_tables: torch.Tensor  # [B * max_blocks] int64, padded with the null block 0
    num_seqs: int
    max_query_len: int
    max_blocks: int
    query_index: torch.Tensor | None  # [B * max_query_len] rows of the flat batch (None when uniform)
    output_index: torch.Tensor | None  # [T] rows of the padded output that are real tokens
    mask: torch.Tensor | None  # [B, 1, max_query_len, max_blocks * block_size] bool, True = visible


class AttentionBackend(Protocol):
    def prepare(
        self, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], slots: np.ndarray
    ) -> AttnMetadata: ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttnMetadata,
        scale: float,
    ) -> torch.Tensor: ...


class TorchPagedAttention:
    """Reference paged attention in PyTorch: gather pages, then SDPA with grouped-query heads."""

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device

    def prepare(
        self, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], slots: np.ndarray
    ) -> AttnMetadata:
        b, bs = len(query_lens), self.block_size
        max_q = max(query_lens)
        max_blocks = max(-(-n // bs) for n in seq_lens)
        table = np.zeros((b, max_blocks), dtype=np.int64)
        for i, row in enumerate(block_tables):
            n = min(len(row), max_blocks)
            table[i, :n] = row[:n]
        q_lens = np.asarray(query_lens)
        ctx = np.asarray(seq_lens) - q_lens
        # Position of every (padded) query row; padded rows see only key 0 so no softmax row is empty.
        offsets = np.arange(max_q)
        q_pos = np.where(offsets[None, :] < q_lens[:, None], ctx[:, None] + offsets[None, :], 0)
        k_pos = np.arange(max_blocks * bs)
        mask = k_pos[None, None, :] <= q_pos[:, :, None]
        uniform = bool((q_lens == max_q).all())
        query_index = output_index = None
        if not uniform:
            starts = np.concatenate(([0], np.cumsum(q_lens)[:-1]))
            real = offsets[None, :] < q_lens[:, None]
            query_index = torch.from_numpy(np.where(real, starts[:, None] + offsets[None, :], 0).reshape(-1))
            output_index = torch.from_numpy(np.flatnonzero(real.reshape(-1)))
            query_index, output_index = query_index.to(self.device), output_index.to(self.device)
        to = self.device
        return AttnMetadata(
            slot_mapping=torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(to),
            block_tables=torch.from_numpy(table.reshape(-1)).to(to),
            num_seqs=b,
            max_query_len=max_q,
            max_blocks=max_blocks,
            query_index=query_index,
            output_index=output_index,
            mask=torch.from_numpy(mask[:, None]).to(to),
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttnMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D], caches [num_blocks, block_size, Hkv, D] -> [T, Hq, D]."""
        _, hkv, d = k.shape
        k_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, v)
        b, mq, hq = meta.num_seqs, meta.max_query_len, q.shape[1]
        length = meta.max_blocks * self.block_size
        keys = k_cache.index_select(0, meta.block_tables).view(b, length, hkv, d).transpose(1, 2)
        values = v_cache.index_select(0, meta.block_tables).view(b, length, hkv, d).transpose(1, 2)
        if meta.query_index is not None:
            q = q.index_select(0, meta.query_index)
        queries = q.view(b, mq, hq, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=meta.mask, scale=scale, enable_gqa=hq != hkv
        )
        out = out.transpose(1, 2).reshape(b * mq, hq, d)
        return out if meta.output_index is None else out.index_select(0, meta.output_index)


def make_backend(name: str, block_size: int, device: torch.device) -> AttentionBackend:
    if name == "torch":
        return TorchPagedAttention(block_size, device)
    raise ValueError(f"unknown attention backend '{name}' (available: torch)")
