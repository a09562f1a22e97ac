"""The KV pages: one preallocated tensor holding every layer's K and V pages."""

from __future__ import annotations

import torch


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
