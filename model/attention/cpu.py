"""Paged attention on CPU with a C++ kernel that reads K/V through the block tables in place.

`TorchPagedAttention` gathers every page of a sequence into a fresh tensor before SDPA, once per layer and step:
for decoding that copy costs more than the attention itself (at batch 1 and a 300-token context about a
sixth of the step, and most of a 16-sequence step at 2,000-token contexts). This backend keeps its prompt
and long-chunk paths (compute-bound, where SDPA is good) and sends every other row (decodes, speculative
verification, short chunks, with any mix of query lengths) to one kernel call per layer. The kernel comes
from `model.cpu_kernels`, which builds it; this module only lays out its metadata.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch

from model.attention.paged import AttnGroup, TorchPagedAttention, padded_tables
from model.attention.tree import row_masks


class CpuPagedAttention(TorchPagedAttention):
    """`TorchPagedAttention` with its gather-and-mask path replaced by the in-place C++ kernel."""

    def __init__(self, block_size: int, device: torch.device, kernel: ModuleType):
        if device.type != "cpu":
            raise ValueError(f"the 'cpu' attention backend runs on CPU tensors, not on {device}")
        super().__init__(block_size, device)
        self.kernel = kernel

    def _paged_key(self, query_len: int, seq_len: int) -> tuple:
        return ("inplace",)  # the kernel takes any mix of query and context lengths in one call

    def _group(
        self, query_lens: list[int], seq_lens: list[int], tables: list[list[int]], rows, parents: list
    ) -> AttnGroup:
        width = max(-(-n // self.block_size) for n in seq_lens)
        row_seq = np.repeat(np.arange(len(tables)), query_lens)
        # row j of a sequence with L keys and n new tokens sits at position L - n + j: it sees L - n + j + 1 keys
        row_keys = np.concatenate([np.arange(n_keys - n + 1, n_keys + 1) for n, n_keys in zip(query_lens, seq_lens)])
        row_mask = None  # a tree row also drops the keys of other branches among its last 64
        if any(p is not None for p in parents):
            row_mask = np.concatenate(
                [np.full(n, -1, dtype=np.int64) if p is None else row_masks(p) for n, p in zip(query_lens, parents)]
            )
            row_mask = torch.from_numpy(row_mask)
        return AttnGroup(
            kind="inplace",
            rows=rows,
            num_seqs=len(tables),
            query_len=max(query_lens),
            max_blocks=width,
            block_tables=torch.from_numpy(padded_tables(tables, width)),
            row_seq=torch.from_numpy(row_seq),
            row_keys=torch.from_numpy(row_keys),
            row_mask=row_mask,
        )

    def _attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: AttnGroup, scale: float
    ) -> torch.Tensor:
        return self.kernel.paged_attention(
            q, k_cache, v_cache, g.block_tables, g.row_seq, g.row_keys, scale, g.row_mask
        )
