"""The KV pages: one preallocated tensor holding every layer's K and V pages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SlotMove:
    """A verified token tree to compact: `path` lists the accepted nodes root first (`path[0] == 0`, the node
    at slot position `start`); node `path[d]` moves from position start + path[d] to start + d."""

    block_table: list[int]
    start: int
    path: list[int]


def path_slots(moves: list[SlotMove], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination slots of every node that is not in place yet (at most k per sequence)."""
    src, dst = [], []
    for m in moves:
        table = np.asarray(m.block_table, dtype=np.int64)
        for depth, node in enumerate(m.path):
            if node != depth:
                a, b = m.start + node, m.start + depth
                src.append(table[a // block_size] * block_size + a % block_size)
                dst.append(table[b // block_size] * block_size + b % block_size)
    return np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)


class KVPages:
    """Pages laid out [layers, 2, num_blocks, block_size, kv_heads, head_dim]; block 0 is the null block."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.data = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @classmethod
    def blocks_for_budget(
        cls, budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype
    ) -> int:
        return int(budget_bytes // cls.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype))

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Apply copy-on-write pairs (src, dst) for every layer in one indexing op."""
        if pairs:
            src = torch.tensor([s for s, _ in pairs], device=self.data.device)
            dst = torch.tensor([d for _, d in pairs], device=self.data.device)
            self.data[:, :, dst] = self.data[:, :, src]

    def move_slots(self, src: np.ndarray, dst: np.ndarray) -> None:
        """K/V of slot src[i] into slot dst[i] in every layer, in one indexing op; every source is read
        before any destination is written, so a path may move onto slots its other nodes leave."""
        if len(src):
            flat = self.data.view(*self.data.shape[:2], -1, *self.data.shape[4:])
            s = torch.from_numpy(src).to(self.data.device)
            flat[:, :, torch.from_numpy(dst).to(self.data.device)] = flat[:, :, s]
