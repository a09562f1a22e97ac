"""The C++ small-batch matmul against F.linear, and the model routing few-row matmuls through it."""

from __future__ import annotations

import pytest
import torch

from model.cpu_kernels import SMALL_MATMUL_MAX_ROWS


@pytest.mark.parametrize("rows", [1, 5, 8, 11, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_small_matmul_matches_linear(rows, bias, cpu_kernels):
    """Odd shapes too: K not a multiple of the vector width, N not a multiple of the thread grain."""
    torch.manual_seed(rows)
    for n, k in [(960, 576), (37, 13), (1, 8)]:
        x, w = torch.randn(rows, k), torch.randn(n, k)
        b = torch.randn(n) if bias else None
        out = cpu_kernels.small_matmul(x, w, b)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match=f"at most {SMALL_MATMUL_MAX_ROWS} rows"):
        cpu_kernels.small_matmul(torch.randn(SMALL_MATMUL_MAX_ROWS + 1, 8), torch.randn(4, 8), None)


def test_engine_routes_decode_matmuls_through_the_kernel(make_engine):
    """With the kernels on, a float32 CPU model's linear layers carry the small matmul and its norms and layers
    the fused ops; with them off, none do."""
    on = make_engine()
    layer = on.runner.model.layers[0]
    assert layer.down.small_matmul is not None and layer.fused is not None and layer.post_norm.fused is not None
    assert type(on.runner.backend).__name__ == "CpuPagedAttention"
    off = make_engine(cpu_kernels=False)
    assert all(getattr(m, "small_matmul", None) is None for m in off.runner.model.modules())
    assert all(getattr(m, "fused", None) is None for m in off.runner.model.modules())
    assert type(off.runner.backend).__name__ == "TorchPagedAttention"
