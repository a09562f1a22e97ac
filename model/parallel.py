"""Tensor-parallel building blocks: linear layers that know their rank and world size.

Column-parallel layers hold a slice of the output features, row-parallel layers a slice of the input features
followed by an all-reduce; the vocabulary is split across ranks for the embedding and the LM head. With world
size 1 every collective is a no-op, so the same model code serves one process and a group of shard actors.

Splits need not be even: a dimension is cut into whole units (an attention head group, a single MLP row) and
the first `n % world_size` ranks take one unit more (`ParallelContext.span`). That is what lets a model with 3
KV heads run on 2 ranks (2 + 1 heads); dimensions that divide evenly split evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.cpu_kernels import SMALL_MATMUL_MAX_ROWS
from model.quant import PackedWeight


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

    def span(self, n: int, unit: int = 1, rank: int | None = None) -> tuple[int, int]:
        """This rank's (start, size) of `n` items cut into whole units of `unit` items, the first ranks taking
        the remainder: heads must not be split mid-group, and every rank must agree on every other's slice."""
        if unit <= 0 or n % unit:
            raise ValueError(f"{n} items do not split into units of {unit}")
        units, r = n // unit, self.rank if rank is None else rank
        base, extra = divmod(units, self.world_size)
        start = r * base + min(r, extra)
        return start * unit, (base + (r < extra)) * unit

    def max_span(self, n: int, unit: int = 1) -> int:
        """The largest size any rank gets from `span` (rank 0's), e.g. to size per-rank buffers alike."""
        return self.span(n, unit, rank=0)[1]


def rank_kv_cache_bytes(budget_bytes: int, num_kv_heads: int, tp: ParallelContext) -> int:
    """This rank's share of a per-rank KV budget such that every rank's pool has the same number of blocks.

    One block manager drives all ranks, so a block id must exist on every rank. With an uneven head split the
    rank holding the most KV heads is the binding one: blocks = budget // (bytes per block at max heads), and
    this rank gets budget * local_heads // max_heads, which gives exactly that many blocks of its own (smaller)
    size, because floor(floor(x) / m) = floor(x / m) for whole m.
    """
    return budget_bytes * tp.span(num_kv_heads)[1] // tp.max_span(num_kv_heads)


def cpu_packed(weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-prepacked copy of a float32 [out, in] CPU weight, or None where that is unavailable.

    On CPU, small-batch matmuls (decode, speculative verification) through MKL's sgemm with the weight
    as stored run far below memory bandwidth; the prepacked oneDNN path is about 1.5x faster at batch 1
    and 2x at batch 5-16 on a 2-core machine. The result equals F.linear up to summation order.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)
    except (AttributeError, RuntimeError):
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None, bias=None, small=None) -> torch.Tensor:
    """x W^T (+ bias): a few rows through `small` (the C++ small-batch matmul) when set, more through oneDNN's
    prepacked GEMM when available, else F.linear."""
    if small is not None and x.shape[0] <= SMALL_MATMUL_MAX_ROWS:
        return small(x, weight, bias)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def project(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer's x W^T (+ bias): through its packed GGUF weight when it has one (`use_packed`), else
    through `linear` on its float32 weight."""
    if layer.quant is not None:
        return layer.quant.matmul(x, layer.kernels, bias)
    return linear(x, layer.weight, layer.packed, bias, layer.small_matmul)


def kernel_weight(layer: nn.Module) -> tuple[torch.Tensor, int, int]:
    """The matrix `project` multiplies by, as the C++ decoder stack takes it: (GGUF blocks, their type, rows) when
    the layer runs packed, else (the float32 weight, -1, rows)."""
    if layer.quant is not None:
        return layer.quant.data, layer.quant.qtype, layer.quant.out_features
    return layer.weight, -1, layer.weight.shape[0]


def drop_float_weight(layer: nn.Module) -> None:
    """Free a layer's float32 weight once a packed one replaces it (no reader is left)."""
    layer.weight = nn.Parameter(layer.weight.new_empty(0, layer.weight.shape[1]), requires_grad=False)


def _rows(weight, start: int, size: int) -> torch.Tensor:
    """Read rows [start, start+size) of a lazily loaded tensor (safetensors slice or tensor)."""
    return weight[start : start + size]


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows; `parts` are the fused sub-matrices (e.g. q, k, v).

    `units[i]` is the row count of part i's indivisible unit (a query-head group, one KV head); each part is
    split by `ParallelContext.span`, so the parts stay aligned (rank r's q heads match its k/v heads).
    """

    def __init__(
        self,
        in_features: int,
        parts: list[int],
        tp: ParallelContext,
        bias: bool = False,
        units: list[int] | None = None,
    ):
        super().__init__()
        self.tp = tp
        spans = [tp.span(p, u) for p, u in zip(parts, units or [1] * len(parts))]
        self.part_starts = [start for start, _ in spans]  # rows of the full checkpoint tensor
        self.local_parts = [size for _, size in spans]
        out = sum(self.local_parts)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None
        self.small_matmul = None  # set by CausalLM.use_cpu_kernels
        self.quant: PackedWeight | None = None  # the GGUF blocks, set by use_packed
        self.kernels = None  # set by CausalLM.use_cpu_kernels

    def load_part(self, index: int, tensor, param: str = "weight") -> None:
        """Copy this rank's rows of fused part `index` (a weight or a bias) from the full checkpoint tensor."""
        size = self.local_parts[index]
        offset = sum(self.local_parts[:index])
        getattr(self, param)[offset : offset + size].copy_(_rows(tensor, self.part_starts[index], size))

    def finalize(self) -> None:
        self.packed = cpu_packed(self.weight) if self.quant is None else None

    def use_packed(self, parts: list[PackedWeight]) -> None:
        """Run on the full checkpoint's fused parts in GGUF blocks, this rank's rows of each."""
        local = [p.rows(start, size) for p, start, size in zip(parts, self.part_starts, self.local_parts)]
        self.quant = PackedWeight.cat_rows(local)
        drop_float_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self, x, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T: each rank holds a slice of the input features.

    The slice is `tp.span(in_features, unit)`, matching the column-parallel layer that feeds it.
    """

    def __init__(self, in_features: int, out_features: int, tp: ParallelContext, unit: int = 1):
        super().__init__()
        self.tp = tp
        self.in_start, self.local_in = tp.span(in_features, unit)
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in), requires_grad=False)
        self.packed: torch.Tensor | None = None
        self.small_matmul = None  # set by CausalLM.use_cpu_kernels
        self.quant: PackedWeight | None = None  # the GGUF blocks, set by use_packed
        self.kernels = None  # set by CausalLM.use_cpu_kernels

    def finalize(self) -> None:
        self.packed = cpu_packed(self.weight) if self.quant is None else None

    def load(self, weight) -> None:
        self.weight.copy_(weight[:, self.in_start : self.in_start + self.local_in])

    def use_packed(self, weight: PackedWeight) -> None:
        """Run on this rank's input features of the full checkpoint matrix in GGUF blocks (whole blocks)."""
        self.quant = weight.columns(self.in_start, self.local_in)
        drop_float_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(project(self, x))


class VocabParallelEmbedding(nn.Module):
    """Embedding (and tied LM head) with the vocabulary split across ranks."""

    def __init__(self, vocab_size: int, hidden: int, tp: ParallelContext):
        super().__init__()
        self.tp = tp
        self.local_vocab = -(-vocab_size // tp.world_size)
        self.vocab_start = tp.rank * self.local_vocab
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.zeros(self.local_vocab, hidden), requires_grad=False)
        self.packed: torch.Tensor | None = None
        self.small_matmul = None  # set by CausalLM.use_cpu_kernels
        self.quant: PackedWeight | None = None  # the LM head in GGUF blocks, set by use_packed
        self.kernels = None  # set by CausalLM.use_cpu_kernels

    def finalize(self) -> None:
        self.packed = cpu_packed(self.weight) if self.quant is None else None

    def use_packed(self, weight: PackedWeight) -> None:
        """Compute logits on this rank's vocabulary rows in GGUF blocks (zero rows pad the last rank, as the
        float32 table does). The float32 table stays for the token lookup, which reads a few rows a step."""
        n = min(self.local_vocab, self.vocab_size - self.vocab_start)
        local = weight.rows(self.vocab_start, n)
        if n < self.local_vocab:
            pad = local.data.new_zeros(self.local_vocab - n, local.row_bytes)  # zero scales: zero weights
            local = PackedWeight(local.qtype, torch.cat([local.data, pad]), self.local_vocab, local.in_features)
        self.quant = local

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
        out = project(self, hidden)
        return self.tp.all_gather_last(out)[..., : self.vocab_size]
