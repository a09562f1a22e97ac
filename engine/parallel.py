"""Tensor-parallel building blocks: linear layers that know their rank and world size.

Column-parallel layers hold a slice of the output features, row-parallel layers a slice of the input features
followed by an all-reduce; the vocabulary is split across ranks for the embedding and the LM head. With world
size 1 every collective is a no-op, so the same model code serves one process and a group of shard actors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's slice along the last dimension."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def shard(self, n: int, what: str) -> int:
        if n % self.world_size:
            raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={self.world_size}")
        return n // self.world_size


def _rows(weight, start: int, size: int) -> torch.Tensor:
    """Read rows [start, start+size) of a lazily loaded tensor (safetensors slice or tensor)."""
    return weight[start : start + size]


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows; `parts` are the fused sub-matrices (e.g. q, k, v)."""

    def __init__(self, in_features: int, parts: list[int], tp: ParallelContext, bias: bool = False):
        super().__init__()
        self.tp = tp
        self.local_parts = [tp.shard(p, "output features") for p in parts]
        out = sum(self.local_parts)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None

    def load_part(self, index: int, tensor, param: str = "weight") -> None:
        """Copy this rank's rows of fused part `index` (a weight or a bias) from the full checkpoint tensor."""
        size = self.local_parts[index]
        offset = sum(self.local_parts[:index])
        getattr(self, param)[offset : offset + size].copy_(_rows(tensor, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T: each rank holds a slice of the input features."""

    def __init__(self, in_features: int, out_features: int, tp: ParallelContext):
        super().__init__()
        self.tp = tp
        self.local_in = tp.shard(in_features, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in), requires_grad=False)

    def load(self, weight) -> None:
        start = self.tp.rank * self.local_in
        self.weight.copy_(weight[:, start : start + self.local_in])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Embedding (and tied LM head) with the vocabulary split across ranks."""

    def __init__(self, vocab_size: int, hidden: int, tp: ParallelContext):
        super().__init__()
        self.tp = tp
        self.local_vocab = -(-vocab_size // tp.world_size)
        self.vocab_start = tp.rank * self.local_vocab
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.zeros(self.local_vocab, hidden), requires_grad=False)

    def load(self, weight) -> None:
        n = min(self.local_vocab, self.vocab_size - self.vocab_start)
        self.weight[:n].copy_(_rows(weight, self.vocab_start, n))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[:, None], 0.0)
        return self.tp.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last(F.linear(hidden, self.weight))[..., : self.vocab_size]
