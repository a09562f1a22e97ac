"""Linear weights kept in their GGUF block format (Q4_0, Q4_1, Q8_0) and multiplied packed.

A decode step of a small model on CPU is bound by reading the weights: the default model's linear layers are
540 MB as float32 but 96 MB as shipped (Q4_1 layers, a Q8_0 embedding). `PackedWeight` holds one [out, in]
matrix as its GGUF blocks (32 weights along `in` a block, fp16 scales), so rows slice freely and columns in
whole blocks (tensor parallelism); the C++ kernel (`csrc/quant_matmul.cpp`) multiplies the blocks as they are
for decode and verification steps (up to 64 rows by its own paths, or a GEMM over dequantized tiles of W) and
short prefills; longer prefills get the matrix dequantized to a float32 scratch for one GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.cpu_kernels import QUANT_MATMUL_MAX_ROWS

BLOCK = 32  # weights a block, along the input features
# ggml type id -> bytes a block: Q4_0 (fp16 d, 16 bytes of nibble pairs), Q4_1 (+ fp16 m), Q8_0 (fp16 d, 32 int8)
BLOCK_BYTES = {2: 18, 3: 20, 8: 34}
QTYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}


@dataclass(frozen=True)
class PackedWeight:
    """An [out_features, in_features] matrix as GGUF blocks: `data` uint8 [out_features, in_features / 32 * block
    bytes], each row its blocks in order."""

    qtype: int
    data: torch.Tensor
    out_features: int
    in_features: int

    def __post_init__(self):
        if self.qtype not in BLOCK_BYTES:
            raise ValueError(f"unsupported quantization type {self.qtype}; packed: {sorted(QTYPE_NAMES.values())}")
        if self.in_features % BLOCK or tuple(self.data.shape) != (self.out_features, self.row_bytes):
            raise ValueError(f"packed data {tuple(self.data.shape)} is no [{self.out_features}, {self.in_features}]")

    @property
    def row_bytes(self) -> int:
        return self.in_features // BLOCK * BLOCK_BYTES[self.qtype]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def name(self) -> str:
        return QTYPE_NAMES[self.qtype]

    def rows(self, start: int, size: int) -> PackedWeight:
        return PackedWeight(self.qtype, self.data[start : start + size].contiguous(), size, self.in_features)

    def columns(self, start: int, size: int) -> PackedWeight:
        """Input features [start, start+size): whole blocks only, which a row-parallel split must respect."""
        if start % BLOCK or size % BLOCK:
            raise ValueError(
                f"a {self.name} weight splits its input features only in blocks of {BLOCK}: "
                f"[{start}, {start + size}) is not; run this model with weights: fp32 at this tensor_parallel_size"
            )
        b = BLOCK_BYTES[self.qtype]
        data = self.data[:, start // BLOCK * b : (start + size) // BLOCK * b].contiguous()
        return PackedWeight(self.qtype, data, self.out_features, size)

    @staticmethod
    def cat_rows(parts: list[PackedWeight]) -> PackedWeight:
        """The parts stacked by output rows (fused q|k|v, gate|up); they must share type and input features."""
        if len({(p.qtype, p.in_features) for p in parts}) != 1:
            raise ValueError("fused parts of a packed linear layer differ in type or input features")
        first = parts[0]
        data = torch.cat([p.data for p in parts])
        return PackedWeight(first.qtype, data, sum(p.out_features for p in parts), first.in_features)

    def dequantize(self, kernels) -> torch.Tensor:
        """The float32 [out, in] matrix (exactly the dequantized checkpoint's values)."""
        return kernels.quant_dequantize(self.data, self.qtype, self.out_features, self.in_features)

    def linear(self, x: torch.Tensor, kernels, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`matmul` of rows x [..., in_features] of any float dtype: float32 [..., out_features]."""
        out = self.matmul(x.reshape(-1, x.shape[-1]).float().contiguous(), kernels, bias)
        return out.view(*x.shape[:-1], self.out_features)

    def matmul(self, x: torch.Tensor, kernels, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias): up to 256 rows in the packed kernel (its own paths up to 64, or a GEMM over dequantized
        tiles of W, whichever `model.quant_gemm_rows` measured faster); a longer prefill gets W dequantized
        whole for one GEMM."""
        if x.shape[0] <= QUANT_MATMUL_MAX_ROWS:
            return kernels.quant_matmul(x, self.data, self.qtype, self.out_features, bias)
        return F.linear(x, self.dequantize(kernels), bias)


def quantize_q8_0(weight: torch.Tensor) -> PackedWeight:
    """A float [out, in] matrix as Q8_0 blocks (int8 weight-only quantization of a float checkpoint): per block of
    32 input features, d = max |w| / 127 (stored as fp16) and q = round(w / d). Finer than one scale per output
    channel, and it runs on the same packed kernel as a GGUF's Q8_0 matrices."""
    out_features, in_features = weight.shape
    if in_features % BLOCK:
        raise ValueError(f"int8 quantization needs input features in blocks of {BLOCK}, not {in_features}")
    w = weight.detach().float().reshape(out_features, in_features // BLOCK, BLOCK)
    d = (w.abs().amax(dim=2, keepdim=True) / 127).half()
    scale = d.float()
    q = torch.where(scale > 0, torch.round(w / scale.clamp_min(1e-30)), 0.0).clamp(-127, 127).to(torch.int8)
    blocks = torch.cat([d.view(torch.uint8), q.view(torch.uint8)], dim=2)  # {fp16 d, int8 q[32]}, as GGUF lays it
    return PackedWeight(8, blocks.reshape(out_features, -1).contiguous(), out_features, in_features)
