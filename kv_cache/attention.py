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
class AttnGroup:
    """Sequences of one step that feed the same number of new tokens: attended without query padding."""

    rows: torch.Tensor | None  # [n * q_len] rows of the flat batch, in order (None: the whole batch)
    block_tables: torch.Tensor  # [n * max_blocks] int64, padded with the null block 0
    num_seqs: int
    query_len: int
    max_blocks: int
    mask: torch.Tensor  # [n, 1, q_len, max_blocks * block_size] bool, True = visible


@dataclass
class AttnMetadata:
    """Per-step layout of the flattened batch: T new tokens belonging to B sequences."""

    slot_mapping: torch.Tensor  # [T] int64: pool slot each new token's K/V is written to
    groups: list[AttnGroup]


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
        starts = np.concatenate(([0], np.cumsum(query_lens)[:-1]))
        by_len: dict[int, list[int]] = {}
        for i, n in enumerate(query_lens):
            by_len.setdefault(n, []).append(i)
        groups = []
        for q_len, members in by_len.items():
            rows = None
            if len(by_len) > 1:
                rows = torch.from_numpy((starts[members][:, None] + np.arange(q_len)[None, :]).reshape(-1))
                rows = rows.to(self.device)
            groups.append(self._group(q_len, [seq_lens[i] for i in members], [block_tables[i] for i in members], rows))
        slot_mapping = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(self.device)
        return AttnMetadata(slot_mapping, groups)

    def _group(self, q_len: int, seq_lens: list[int], tables: list[list[int]], rows) -> AttnGroup:
        bs = self.block_size
        max_blocks = max(-(-n // bs) for n in seq_lens)
        table = np.zeros((len(tables), max_blocks), dtype=np.int64)
        for i, row in enumerate(tables):
            n = min(len(row), max_blocks)
            table[i, :n] = row[:n]
        # Query j of a sequence with L keys sits at position L - q_len + j and sees keys up to it.
        q_pos = np.asarray(seq_lens)[:, None] - q_len + np.arange(q_len)[None, :]
        mask = np.arange(max_blocks * bs)[None, None, :] <= q_pos[:, :, None]
        return AttnGroup(
            rows=rows,
            block_tables=torch.from_numpy(table.reshape(-1)).to(self.device),
            num_seqs=len(tables),
            query_len=q_len,
            max_blocks=max_blocks,
            mask=torch.from_numpy(mask[:, None]).to(self.device),
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
        if len(meta.groups) == 1:
            return self._attend(q, k_cache, v_cache, meta.groups[0], scale)
        out = torch.empty_like(q)
        for g in meta.groups:
            out.index_copy_(0, g.rows, self._attend(q.index_select(0, g.rows), k_cache, v_cache, g, scale))
        return out

    def _attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: AttnGroup, scale: float
    ) -> torch.Tensor:
        """q [n * q_len, Hq, D] for the group's sequences -> same shape."""
        hkv, d = k_cache.shape[2], k_cache.shape[3]
        b, mq, hq = g.num_seqs, g.query_len, q.shape[1]
        length = g.max_blocks * self.block_size
        keys = k_cache.index_select(0, g.block_tables).view(b, length, hkv, d).transpose(1, 2)
        values = v_cache.index_select(0, g.block_tables).view(b, length, hkv, d).transpose(1, 2)
        queries = q.reshape(b, mq, hq, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=g.mask, scale=scale, enable_gqa=hq != hkv)
        return out.transpose(1, 2).reshape(b * mq, hq, d)


def make_backend(name: str, block_size: int, device: torch.device) -> AttentionBackend:
    if name == "torch":
        return TorchPagedAttention(block_size, device)
    raise ValueError(f"unknown attention backend '{name}' (available: torch)")
