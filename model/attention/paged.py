"""Paged attention behind one interface.

The model calls `backend.prepare(...)` once per step and `backend.forward(...)` once per layer; the scheduler
and the model never see how K/V are laid out. `TorchPagedAttention` is pure PyTorch and runs on any device:
it writes the step's K/V into the pool through the slot mapping, gathers each sequence's pages through its
block table and calls `scaled_dot_product_attention` with a mask that is causal inside the new tokens and
open to the whole cached context (bottom-right aligned, as speculative verification needs). Two shortcuts keep
it fast: a prompt prefilled from position 0 attends to its own new K/V with `is_causal` (no gather, no mask,
and the kernel skips the masked half), and sequences are grouped by query length and by context length
(power-of-two buckets of blocks), so a short sequence is not padded to the longest one in the batch.

A sequence may verify a token tree instead of a chain (`model.attention.tree`): its rows then see the cached
context and their own ancestors only; such a sequence always takes the masked path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from model.attention.tree import ancestor_matrix, check_parents, is_chain


@dataclass
class AttnGroup:
    """Sequences of one step attended together, without query padding.

    kind "prompt": whole prompts (no cached context) attend causally to their own new K/V;
    kind "chunk": one long prefill chunk after `context_len` cached tokens (context and new part separately,
    merged by log-sum-exp, so neither the context nor a mask is materialised for the new part);
    kind "paged": the rest (decodes, speculative verification, short chunks) gather their pages and use a mask;
    kind "inplace": the same rows, any mix of lengths, for a kernel that reads pages in place (`CpuPagedAttention`).
    """

    kind: str
    rows: torch.Tensor | None  # the group's rows of the flat batch, in order (None: the whole batch)
    num_seqs: int
    query_len: int
    max_blocks: int = 0
    block_tables: torch.Tensor | None = None  # [n * max_blocks] ("inplace": [n, max_blocks]) int64, 0-padded
    mask: torch.Tensor | None = None  # "paged": [n, 1, q_len, max_blocks * block_size] bool, True = visible
    context_len: int = 0  # "chunk": cached tokens before the chunk
    row_seq: torch.Tensor | None = None  # "inplace": [rows] int64, the group's sequence of each query row
    row_keys: torch.Tensor | None = None  # "inplace": [rows] int64, keys visible to each query row
    row_mask: torch.Tensor | None = None  # "inplace" with a tree: [rows] int64, `tree.row_masks` (-1: causal)


@dataclass
class AttnMetadata:
    """Per-step layout of the flattened batch: T new tokens belonging to B sequences."""

    slot_mapping: torch.Tensor  # [T] int64: pool slot each new token's K/V is written to
    groups: list[AttnGroup]

    def inplace_only(self) -> AttnGroup | None:
        """The step's one group when every row of the batch takes the in-place kernel (a decode or verification
        step on `CpuPagedAttention`), else None."""
        if len(self.groups) == 1 and self.groups[0].kind == "inplace" and self.groups[0].rows is None:
            return self.groups[0]
        return None


class AttentionBackend(Protocol):
    def prepare(
        self,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        slots: np.ndarray,
        trees: Sequence[Sequence[int] | None] | None = None,
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

    # A prefill chunk at least this long after cached context takes the split path (CPU kernel with LSE).
    split_chunk_min = 64

    def prepare(
        self,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        slots: np.ndarray,
        trees: Sequence[Sequence[int] | None] | None = None,
    ) -> AttnMetadata:
        """`trees[i]`, when given and not None, holds the parent index of each of sequence i's new rows
        (`model.attention.tree`); the others are causal."""
        starts = np.concatenate(([0], np.cumsum(query_lens)[:-1]))
        split = self.device.type == "cpu"
        parents = self._trees(query_lens, trees)
        by_key: dict[tuple, list[int]] = {}
        for i, (n, length) in enumerate(zip(query_lens, seq_lens)):
            if parents[i] is not None:
                key: tuple = self._paged_key(n, length)
            elif n == length:
                key = ("prompt", n)
            elif split and n >= self.split_chunk_min:
                key = ("chunk", i)
            else:
                key = self._paged_key(n, length)
            by_key.setdefault(key, []).append(i)
        groups = []
        for key, members in by_key.items():
            q_len = query_lens[members[0]]
            rows = None
            if len(by_key) > 1:
                rows = np.concatenate([np.arange(starts[i], starts[i] + query_lens[i]) for i in members])
                rows = torch.from_numpy(rows).to(self.device)
            lens, tables = [seq_lens[i] for i in members], [block_tables[i] for i in members]
            if key[0] == "prompt":
                groups.append(AttnGroup("prompt", rows, len(members), q_len))
            elif key[0] == "chunk":
                context = lens[0] - q_len
                table = torch.tensor(tables[0][: -(-context // self.block_size)], dtype=torch.int64)
                groups.append(AttnGroup("chunk", rows, 1, q_len, len(table), table.to(self.device), None, context))
            else:
                groups.append(
                    self._group([query_lens[i] for i in members], lens, tables, rows, [parents[i] for i in members])
                )
        slot_mapping = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(self.device)
        return AttnMetadata(slot_mapping, groups)

    @staticmethod
    def _trees(query_lens: list[int], trees) -> list[np.ndarray | None]:
        """Validated parents per sequence; None for a causal one (a chain-shaped tree included)."""
        if trees is None:
            return [None] * len(query_lens)
        if len(trees) != len(query_lens):
            raise ValueError(f"{len(trees)} trees for {len(query_lens)} sequences")
        out: list[np.ndarray | None] = []
        for n, t in zip(query_lens, trees):
            if t is not None and len(t) != n:
                raise ValueError(f"a tree of {len(t)} nodes for {n} new tokens")
            out.append(None if t is None or is_chain(t) else check_parents(t))
        return out

    def _paged_key(self, query_len: int, seq_len: int) -> tuple:
        """Sequences attended together: same query length and the same power of two of context blocks, so a
        short context is not padded to a long one."""
        return ("paged", query_len, (-(-seq_len // self.block_size) - 1).bit_length())

    def _group(
        self, query_lens: list[int], seq_lens: list[int], tables: list[list[int]], rows, parents: list
    ) -> AttnGroup:
        q_len = query_lens[0]
        table = padded_tables(tables, max(-(-n // self.block_size) for n in seq_lens))
        max_blocks, bs = table.shape[1], self.block_size
        # Query j of a sequence with L keys sits at slot L - q_len + j and sees keys up to it.
        q_pos = np.asarray(seq_lens)[:, None] - q_len + np.arange(q_len)[None, :]
        mask = np.arange(max_blocks * bs)[None, None, :] <= q_pos[:, :, None]
        for s, p in enumerate(parents):
            if p is not None:  # a tree: of the new keys, only the row's ancestors
                context = seq_lens[s] - q_len
                mask[s, :, context : context + q_len] = ancestor_matrix(p)
        return AttnGroup(
            kind="paged",
            rows=rows,
            num_seqs=len(tables),
            query_len=q_len,
            max_blocks=max_blocks,
            block_tables=torch.from_numpy(table.reshape(-1)).to(self.device),
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
        out = None if len(meta.groups) == 1 else torch.empty_like(q)
        for g in meta.groups:
            pick = (lambda x: x) if g.rows is None else (lambda x, rows=g.rows: x.index_select(0, rows))
            if g.kind == "prompt":
                res = self._attend_new(pick(q), pick(k), pick(v), g, scale)
            elif g.kind == "chunk":
                res = self._attend_chunk(pick(q), pick(k), pick(v), k_cache, v_cache, g, scale)
            else:
                res = self._attend(pick(q), k_cache, v_cache, g, scale)
            if out is None:
                return res
            out.index_copy_(0, g.rows, res)
        return out

    @staticmethod
    def _attend_new(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: AttnGroup, scale: float) -> torch.Tensor:
        """Whole prompts: causal attention over the step's own K/V, [n * q_len, H, D] each."""
        n, m = g.num_seqs, g.query_len
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
        queries = q.view(n, m, hq, d).transpose(1, 2)
        keys = k.view(n, m, hkv, d).transpose(1, 2)
        values = v.view(n, m, hkv, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=hq != hkv)
        return out.transpose(1, 2).reshape(n * m, hq, d)

    def _attend_chunk(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        g: AttnGroup,
        scale: float,
    ) -> torch.Tensor:
        """One chunk after cached context: full attention to the context plus causal attention to itself."""
        m, c = g.query_len, g.context_len
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        queries = q.view(1, m, hq, d).transpose(1, 2)
        ctx_k = k_cache.index_select(0, g.block_tables).view(1, -1, hkv, d)[:, :c].transpose(1, 2)
        ctx_v = v_cache.index_select(0, g.block_tables).view(1, -1, hkv, d)[:, :c].transpose(1, 2)
        out_ctx, lse_ctx = flash(queries, ctx_k, ctx_v, 0.0, False, scale=scale)
        new_k, new_v = k.view(1, m, hkv, d).transpose(1, 2), v.view(1, m, hkv, d).transpose(1, 2)
        out_new, lse_new = flash(queries, new_k, new_v, 0.0, True, scale=scale)
        w_ctx = torch.sigmoid(lse_ctx - lse_new).unsqueeze(-1)  # share of the softmax mass on the context
        out = out_new + (out_ctx - out_new) * w_ctx
        return out.transpose(1, 2).reshape(m, hq, d)

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


def padded_tables(tables: list[list[int]], width: int) -> np.ndarray:
    """Block tables as one [n, width] int64 array, cut or padded with the null block 0."""
    out = np.zeros((len(tables), width), dtype=np.int64)
    for i, row in enumerate(tables):
        n = min(len(row), width)
        out[i, :n] = row[:n]
    return out
