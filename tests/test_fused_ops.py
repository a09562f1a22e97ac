"""The fused element-wise ops of the CPU kernels against the PyTorch code they replace in the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.decoder import rotate

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("rows", [1, 7, 33])
def test_rms_norm_with_and_without_residual_add(rows, cpu_kernels):
    torch.manual_seed(rows)
    x, delta, w = torch.randn(rows, 576), torch.randn(rows, 576), torch.randn(576)
    torch.testing.assert_close(cpu_kernels.rms_norm(x.clone(), None, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), **TOL)
    stream = x.clone()
    out = cpu_kernels.rms_norm(stream, delta, w, 1e-5)
    torch.testing.assert_close(stream, x + delta, **TOL)  # the residual stream was updated in place
    torch.testing.assert_close(out, F.rms_norm(x + delta, (576,), w, 1e-5), **TOL)


@pytest.mark.parametrize("rows", [1, 5, 20])
def test_rope_in_place_matches_rotate(rows, cpu_kernels):
    """On the q and k heads of a fused qkv row (a strided view), as the model calls it; the v heads untouched."""
    torch.manual_seed(rows)
    qkv = torch.randn(rows, 9 + 3 + 3, 64)
    angles = torch.rand(rows, 1, 32) * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected = rotate(qkv[:, :12], cos, sin)
    v = qkv[:, 12:].clone()
    cpu_kernels.rope_(qkv[:, :12], cos, sin)
    torch.testing.assert_close(qkv[:, :12], expected, **TOL)
    torch.testing.assert_close(qkv[:, 12:], v, atol=0, rtol=0)


@pytest.mark.parametrize("rows", [1, 9, 40])
def test_silu_mul_matches(rows, cpu_kernels):
    torch.manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1536) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), F.silu(gate) * up, **TOL)


def test_fused_ops_reject_other_dtypes(cpu_kernels):
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.silu_mul(torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.rms_norm(torch.randn(2, 8, dtype=torch.bfloat16), None, torch.ones(8), 1e-5)
