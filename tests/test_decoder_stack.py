"""The C++ decoder stack (every layer of a decode or verification step in one call) against the same layers
run one by one from Python: the same kernels in the same order, so the same logits, hidden states and K/V, bit
for bit, for decodes, chains and token trees across block boundaries, packed and float32, plain Llama and with
a qkv bias and Granite's multipliers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import EngineConfig
from model.decoder import DecoderLayer
from model.kv_pages import KVPages
from model.loader import load_arch
from model.runner import ModelRunner, StepInput, packed_weights

BLOCK = 16


def small_runner(folder, weights: str, variant: str) -> ModelRunner:
    """The default model cut to 3 layers; "granite": with a random qkv bias and Granite's multipliers."""
    arch = load_arch(folder)
    if variant == "granite":
        arch = dataclasses.replace(arch, qkv_bias=True, residual_multiplier=0.6, attention_multiplier=0.11)
    packed = packed_weights(EngineConfig(weights=weights), None, arch, 3) if weights == "packed" else None
    runner = ModelRunner(
        folder,
        arch,
        dtype=torch.float32,
        device=torch.device("cpu"),
        block_size=BLOCK,
        kv_cache_bytes=KVPages.bytes_per_block(3, BLOCK, arch.num_kv_heads, arch.head_dim, torch.float32) * 12,
        max_model_len=512,
        num_layers=3,
        packed=packed,
    )
    if variant == "granite":
        gen = torch.Generator().manual_seed(0)
        for layer in runner.model.layers:
            layer.qkv.bias.copy_(torch.randn(layer.qkv.bias.shape, generator=gen) * 0.5)
    assert runner.packed == (weights == "packed")
    return runner


def run_both(runner: ModelRunner, items: list[StepInput], monkeypatch) -> None:
    """Runs `items` through the stack and through the Python layers from the same K/V, and compares."""
    model, kv = runner.model, runner.kv.data
    before = kv.clone()
    with monkeypatch.context() as m:  # the stack must run every layer: a Python layer call fails the test

        def refuse(*args, **kwargs):
            raise AssertionError("a decoder layer ran in Python")

        m.setattr(DecoderLayer, "forward", refuse)
        stacked = runner.execute_with_hidden(items)
    kv_stacked = kv.clone()
    kv.copy_(before)
    kernels, model.stack_kernels = model.stack_kernels, None
    try:
        plain = runner.execute_with_hidden(items)
    finally:
        model.stack_kernels = kernels
    assert torch.equal(stacked.logits, plain.logits)
    assert torch.equal(stacked.hidden, plain.hidden)
    assert torch.equal(kv_stacked, kv)
    assert not torch.equal(kv, before)  # the step wrote its K/V


@pytest.mark.parametrize("weights", ["packed", "fp32"])
@pytest.mark.parametrize("variant", ["llama", "granite"])
def test_stack_equals_layers_run_from_python(model_folder, weights, variant, monkeypatch):
    runner = small_runner(model_folder, weights, variant)
    assert runner.model.stack_kernels is not None
    a = [(i * 7919) % 3000 + 100 for i in range(2 * BLOCK + 13)]  # 45 tokens: blocks 1-3, 3 free slots in 3
    b = [(i * 104729) % 3000 + 100 for i in range(BLOCK - 2)]  # 14 tokens: block 4
    table_a, table_b = [1, 2, 3, 5], [4, 6]
    runner.execute_with_hidden([StepInput(a, 0, table_a, 1), StepInput(b, 0, table_b, 1)])  # prompts: Python

    decode = StepInput([901], len(a), table_a, 1, num_hidden=1)
    chain = StepInput([5, 6, 7, 8, 9], len(a), table_a, 5, num_hidden=5)  # crosses into block 5
    tree = StepInput([11, 12, 13, 14, 15, 16], len(b), table_b, 6, num_hidden=6, tree_parents=[-1, 0, 0, 1, 2, 3])
    run_both(runner, [decode], monkeypatch)
    run_both(runner, [chain], monkeypatch)
    run_both(runner, [chain, tree], monkeypatch)


def test_stack_row_limit_and_fallback(model_folder, monkeypatch):
    """float32 weights take 16 rows (the small matmul's limit), packed 256 (its GEMM by tiles above 64 rows, as
    from Python); a longer verification runs the Python layers, with the same result as before."""
    fp32 = small_runner(model_folder, "fp32", "llama")
    assert fp32.model.decoder_stack().max_rows() == 16
    a = list(range(200, 220))
    fp32.execute_with_hidden([StepInput(a, 0, [1, 2], 1)])
    calls = []
    original = DecoderLayer.forward

    def counted(self, *args):
        calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(DecoderLayer, "forward", counted)
    out = fp32.execute_with_hidden([StepInput(list(range(300, 317)), len(a), [1, 2, 3], 17)])
    assert len(calls) == 3 and out.logits.shape[0] == 17
    packed = small_runner(model_folder, "packed", "llama")
    assert packed.model.decoder_stack().max_rows() == 256
    tables = [[1, 2, 3, 4], [5, 6, 7, 8]]
    packed.execute_with_hidden(
        [StepInput(list(range(300 + 10 * i, 310 + 10 * i)), 0, t, 1) for i, t in enumerate(tables)]
    )
    monkeypatch.undo()
    chains = [
        StepInput(list(range(400 + 40 * i, 440 + 40 * i)), 10, t, 40, num_hidden=40) for i, t in enumerate(tables)
    ]
    run_both(packed, chains, monkeypatch)  # 80 rows: the kernel's GEMM by tiles
