"""The model runner against HF logits: float32 tight, bfloat16 within bfloat16's precision."""

from __future__ import annotations

import pytest
import torch

from model.loader import load_arch
from model.runner import ModelRunner, StepInput


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-3), (torch.bfloat16, 1.5)])
def test_prefill_logits_match_hf(model_folder, hf_model, tokenizer, dtype, atol):
    runner = ModelRunner(
        model_folder,
        load_arch(model_folder),
        dtype=dtype,
        device=torch.device("cpu"),
        block_size=16,
        kv_cache_bytes=64 << 20,
        max_model_len=2048,
    )
    ids = tokenizer('def quicksort(items):\n    """Sort a list."""\n')["input_ids"]
    table = list(range(1, 1 + len(ids) // 16 + 2))
    logits = runner.execute([StepInput(ids, 0, table, len(ids))])
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert (logits - ref).abs().max().item() < atol
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= (1.0 if dtype == torch.float32 else 0.9)
    # decoding one more token from the paged cache equals the full-sequence forward
    nxt = int(ref[-1].argmax())
    step = runner.execute([StepInput([nxt], len(ids), table, 1)])
    with torch.inference_mode():
        full = hf_model(torch.tensor([ids + [nxt]])).logits[0, -1].float()
    assert (step[0] - full).abs().max().item() < atol


def test_hidden_states_are_the_rows_behind_the_logits(model_folder, tokenizer):
    """The final hidden states come from the same forward: times the LM head they are the logits returned."""
    runner = ModelRunner(
        model_folder,
        load_arch(model_folder),
        dtype=torch.float32,
        device=torch.device("cpu"),
        block_size=16,
        kv_cache_bytes=64 << 20,
        max_model_len=2048,
    )
    a, b = tokenizer("def add(a, b):\n")["input_ids"], tokenizer("Once upon a time, in a")["input_ids"]
    items = [StepInput(a, 0, [1, 2], 2, num_hidden=len(a)), StepInput(b, 0, [3, 4], 1, num_hidden=1)]
    out = runner.execute_with_hidden(items)
    assert out.hidden is not None and out.hidden.shape == (len(a) + 1, runner.model.arch.hidden_size)
    lm_head = runner.model.lm_head.weight
    rows = torch.cat([out.hidden[len(a) - 2 : len(a)], out.hidden[len(a) :]])  # the rows that have logits
    assert torch.allclose(rows @ lm_head.T, out.logits, atol=1e-4)
    # a hidden state differs per position, and asking for none returns none
    assert not torch.allclose(out.hidden[0], out.hidden[1])
    assert runner.execute_with_hidden([StepInput(b, 0, [3, 4], 1)]).hidden is None
