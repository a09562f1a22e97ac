"""Linear layers run on GGUF blocks: the kernel against dequantize-then-matmul (gguf's own dequantizer), the
default model's packed matrices against its float32 checkpoint, and greedy outputs packed == float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from model.config import EngineConfig
from model.quant import PackedWeight
from model.quant_gemm_rows import MEASURED_ROWS, mask_of, tune_gemm_rows
from sampling.params import SamplingParams
from tests.conftest import humaneval_prompts

FORMATS = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0]


def random_packed(qtype, n: int, k: int, seed: int) -> tuple[PackedWeight, torch.Tensor]:
    """A random [n, k] matrix quantized by gguf, and gguf's float32 dequantization of it."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    q = quants.quantize(w, qtype)
    return PackedWeight(int(qtype), torch.from_numpy(q), n, k), torch.from_numpy(quants.dequantize(q, qtype))


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 16, 17, 33, 64, 65])
def test_packed_matmul_matches_dequantize_then_matmul(qtype, rows, cpu_kernels):
    """Odd N (not a multiple of the thread tile), K in whole blocks, odd block counts. 1 row takes the factored
    kernel (AVX2), 2-16 (AVX-512: 1-32) the in-register dequantization, then the dequantized tiles or the GEMM by
    tiles up to 64, 65 the whole-matrix GEMM in `PackedWeight.matmul`; every path of the kernel (each vector width
    this CPU has and plain C++; direct, tiled, GEMM by tiles) is run at every row count (above 64 rows the kernel
    always takes the GEMM)."""
    for n, k, bias in [(37, 96, True), (963, 576, False), (1, 32, False), (130, 1536, True)]:
        packed, dense = random_packed(qtype, n, k, seed=rows + n)
        assert torch.equal(packed.dequantize(cpu_kernels), dense)  # exact, not merely close
        gen = torch.Generator().manual_seed(rows + n)
        x = torch.randn(rows, k, generator=gen)
        b = torch.randn(n, generator=gen) if bias else None
        expected = torch.nn.functional.linear(x, dense, b)
        # |y| is about sqrt(k) here; float32 sums of 1536 terms in another order differ by ~1e-4 near y = 0
        tol = {"atol": 5e-4, "rtol": 1e-4}
        torch.testing.assert_close(packed.matmul(x, cpu_kernels, b), expected, **tol)
        for width in cpu_kernels.quant_matmul_widths():  # plain C++ (machines without AVX2), AVX2, AVX-512
            for direct_rows, gemm_rows in ((0, 64), (64, 64), (16, 0)):  # all tiled / all direct / all GEMM
                y = cpu_kernels.quant_matmul(
                    x, packed.data, packed.qtype, n, b, width=width, direct_rows=direct_rows, gemm_rows=gemm_rows
                )
                torch.testing.assert_close(y, expected, **tol)
    with pytest.raises(RuntimeError, match="no 128-bit path"):
        cpu_kernels.quant_matmul(x, packed.data, packed.qtype, n, width=128)


def test_the_gemm_rows_are_measured_on_the_models_matrices_and_kept_per_shape(cpu_kernels):
    """tune_gemm_rows sets the kernel's mask from measured row counts, once per set of shapes (a second engine of
    the same model reuses it); a measured count stands for the counts down to the one measured below it."""
    matrices = [random_packed(GGMLQuantizationType.Q4_1, 300, 576, seed=2)[0]] * 3
    before = cpu_kernels.quant_gemm_mask()
    try:
        rows = tune_gemm_rows(cpu_kernels, matrices, rounds=1)
        assert set(rows) <= set(MEASURED_ROWS) and cpu_kernels.quant_gemm_mask() == mask_of(rows)
        cpu_kernels.set_quant_gemm_mask(0)
        assert tune_gemm_rows(cpu_kernels, matrices) == rows and cpu_kernels.quant_gemm_mask() == mask_of(rows)
    finally:
        cpu_kernels.set_quant_gemm_mask(before)
    assert mask_of((1, 6, 64)) == 0b1 | 0b110000 | (0xFFFF << 48)  # 6 stands for 5-6, 64 for 49-64
    assert mask_of(()) == 0 and mask_of(MEASURED_ROWS) == (1 << 64) - 1


def test_the_process_width_is_what_calls_without_one_take(cpu_kernels):
    """set_quant_width picks the paths of every call that names no width (the decoder stack's), bit for bit;
    a width this build lacks is refused; -1 is back to the widest."""
    packed, _ = random_packed(GGMLQuantizationType.Q4_1, 300, 576, seed=3)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(3))
    widths = cpu_kernels.quant_matmul_widths()
    assert widths[0] == 0 and cpu_kernels.quant_width() == widths[-1]
    try:
        for width in widths:
            cpu_kernels.set_quant_width(width)
            assert cpu_kernels.quant_width() == width
            y = cpu_kernels.quant_matmul(x, packed.data, packed.qtype, 300, gemm_rows=64)
            assert torch.equal(
                y, cpu_kernels.quant_matmul(x, packed.data, packed.qtype, 300, width=width, gemm_rows=64)
            )
        with pytest.raises(RuntimeError, match="no 128-bit path"):
            cpu_kernels.set_quant_width(128)
    finally:
        cpu_kernels.set_quant_width(-1)
    assert cpu_kernels.quant_width() == widths[-1]


def test_packed_weight_slices_for_tensor_parallel_ranks(cpu_kernels):
    """Rows slice anywhere, input features in whole blocks: the two halves of a row-parallel split sum to the
    whole product, and a split inside a block is refused with the way out named."""
    packed, dense = random_packed(GGMLQuantizationType.Q4_1, 45, 128, seed=1)
    x = torch.randn(2, 128)
    halves = [packed.columns(s, 64).matmul(x[:, s : s + 64], cpu_kernels) for s in (0, 64)]
    torch.testing.assert_close(halves[0] + halves[1], x @ dense.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed.rows(10, 7).dequantize(cpu_kernels), dense[10:17], atol=0, rtol=0)
    with pytest.raises(ValueError, match="weights: fp32"):
        packed.columns(0, 48)


def test_packed_needs_cpu_float32():
    with pytest.raises(ValueError, match="weights: packed runs on device cpu"):
        EngineConfig(weights="packed", dtype="bfloat16")
    with pytest.raises(ValueError, match="weights"):
        EngineConfig(weights="q4")


def test_default_model_packs_its_quantized_matrices_exactly(make_engine, cpu_kernels):
    """auto packs the shipped Q4_1 layers and the Q8_0 embedding (as LM head), and each packed matrix, q and k
    rows un-permuted, dequantizes to exactly the float32 checkpoint the fp32 engine runs."""
    packed = make_engine(kv_cache_gib=0.1, max_model_len=512)
    plain = make_engine(kv_cache_gib=0.1, max_model_len=512, weights="fp32")
    assert packed.runner.packed and not plain.runner.packed
    for i in (0, len(packed.runner.model.layers) - 1):
        for name in ("qkv", "o_proj", "gate_up", "down"):
            layer = getattr(packed.runner.model.layers[i], name)
            assert layer.quant.name == "Q4_1" and layer.weight.numel() == 0  # the float32 copy is freed
            assert torch.equal(layer.quant.dequantize(cpu_kernels), getattr(plain.runner.model.layers[i], name).weight)
    head = packed.runner.model.lm_head
    assert head.quant.name == "Q8_0"
    assert torch.equal(head.quant.dequantize(cpu_kernels), plain.runner.model.lm_head.weight)


@pytest.mark.parametrize("speculator", ["none", "ngram"])
def test_greedy_packed_equals_fp32(make_engine, speculator):
    """The same greedy tokens with packed and float32 weights, plain and with n-gram speculation (verification
    runs on the same packed weights, so speculation stays lossless)."""
    prompts = [[{"role": "user", "content": f"Complete this function:\n{p}"}] for p in humaneval_prompts(3)]
    prompts.append("The three primary colors are")
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outs = {}
    for weights in ("fp32", "packed"):
        engine = make_engine(kv_cache_gib=0.1, max_model_len=1024, weights=weights, speculator=speculator)
        outs[weights] = [o.output_token_ids for o in engine.generate(prompts, params)]
    assert outs["packed"] == outs["fp32"]
