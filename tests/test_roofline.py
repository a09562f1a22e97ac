"""The roofline of a decode step (scripts/roofline.py): what it counts as read, and the rate it derives."""

from __future__ import annotations

import pytest

from scripts.roofline import embedding_row_bytes, kv_bytes_per_token, read_bandwidth_gb_per_s, roofline, weight_bytes


def test_step_bytes_of_the_default_model(make_engine):
    """Packed weights count their GGUF blocks (Q4_1 layers: 0.625 bytes a weight; the Q8_0 head), float32 ones
    4 bytes a weight; K/V per context token is layers x (K, V) x kv heads x head dim in float32."""
    packed = make_engine(kv_cache_gib=0.1, max_model_len=512)
    plain = make_engine(kv_cache_gib=0.1, max_model_len=512, weights="fp32")
    arch = plain.runner.model.arch
    assert kv_bytes_per_token(plain) == arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * 4
    assert kv_bytes_per_token(packed) == kv_bytes_per_token(plain)
    assert embedding_row_bytes(plain) == arch.hidden_size * 4
    linear_weights = sum(m.weight.numel() for m in plain.runner.model.modules() if hasattr(m, "quant"))
    assert weight_bytes(plain) == linear_weights * 4
    assert linear_weights * 0.625 < weight_bytes(packed) < linear_weights * 1.0625


def test_roofline_rate_and_share():
    r = roofline(weight_bytes_per_step=9e7, kv_bytes_per_step=1e7, steps_per_s=50.0, bandwidth=10.0)
    assert r["bytes_per_step"] == 100_000_000
    assert r["achieved_gb_per_s"] == pytest.approx(5.0)
    assert r["of_read_bandwidth"] == pytest.approx(0.5)
    assert read_bandwidth_gb_per_s(gib=1 / 64, repeats=2) > 0.1
