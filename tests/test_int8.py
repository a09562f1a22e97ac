"""int8 weight-only quantization of a float checkpoint (`quantization: int8`): Q8_0 blocks run by the packed
kernel, logits close to float32 on real prompts, speculation lossless relative to the int8 model it serves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.quant import quantize_q8_0
from sampling.params import SamplingParams
from tests.conftest import humaneval_prompts

CONFIG = {"kv_cache_gib": 0.25, "max_model_len": 1024}


@pytest.mark.parametrize("shape", [(7, 32), (64, 96), (33, 576)])
def test_quantized_matrix_is_within_half_a_step_and_multiplies_as_dequantized(cpu_kernels, shape):
    torch.manual_seed(0)
    w = torch.randn(*shape) * torch.rand(shape[0], 1)
    w[0, :32] = 0.0  # an all-zero block
    q = quantize_q8_0(w)
    back = q.dequantize(cpu_kernels)
    step = w.reshape(shape[0], -1, 32).abs().amax(2, keepdim=True) / 127
    assert ((back - w).reshape(shape[0], -1, 32).abs() <= step * 0.5 + 1e-3 * step + 1e-12).all()
    assert (back[0, :32] == 0).all()
    for rows in (1, 5, 64, 70):
        x = torch.randn(rows, shape[1])
        torch.testing.assert_close(q.matmul(x, cpu_kernels), F.linear(x, back), rtol=1e-4, atol=1e-4)


def test_int8_rejects_what_it_cannot_run():
    from model.config import EngineConfig

    with pytest.raises(ValueError, match="quantization: int8"):
        EngineConfig(quantization="int8", weights="packed")
    with pytest.raises(ValueError, match="quantization: int8"):
        EngineConfig(quantization="int8", dtype="bfloat16")


@pytest.fixture(scope="module")
def int8_engine(make_engine, model_folder):
    return make_engine(**CONFIG, model=str(model_folder), quantization="int8")


def test_int8_logits_stay_close_to_float32_on_real_prompts(int8_engine, make_engine, model_folder):
    """The stated bound, over three HumanEval prompts teacher-forced through both models: the logits' largest
    error within half their spread (std over the vocabulary) at every position, and the same top token at >= 95%
    of positions."""
    fp32 = make_engine(**CONFIG, model=str(model_folder), weights="fp32")
    assert int8_engine.runner.packed and not fp32.runner.packed
    agree, total, worst = 0, 0, 0.0
    for prompt in humaneval_prompts(3):
        ids = int8_engine.tokenizer.encode(prompt)
        q, f = score(int8_engine, ids), score(fp32, ids)
        worst = max(worst, ((q - f).abs().amax(-1) / f.std(-1)).max().item())
        agree += (q.argmax(-1) == f.argmax(-1)).sum().item()
        total += len(ids)
    assert worst <= 0.5, worst  # measured 0.29 (top token agreeing at 97.8% of positions)
    assert agree / total >= 0.95, agree / total


def score(engine, ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position, from one prefill of the engine's runner (its KV reset after)."""
    from model.runner import StepInput

    engine.reset_kv()
    table = list(range(1, 1 + -(-len(ids) // engine.runner.block_size)))
    logits = engine.runner.execute([StepInput(ids, 0, table, len(ids))])
    engine.reset_kv()
    return logits


def test_speculation_is_lossless_relative_to_the_int8_model(int8_engine, make_engine, model_folder):
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    prompts = humaneval_prompts(3)
    plain = [o.output_token_ids for o in int8_engine.generate(prompts, params)]
    ngram = make_engine(**CONFIG, model=str(model_folder), quantization="int8", speculator="ngram")
    outs = ngram.generate(prompts, params)
    assert [o.output_token_ids for o in outs] == plain
    assert sum(o.metrics.spec.accepted for o in outs) > 0


def test_the_int8_model_is_served_under_its_own_name():
    from deployments.app_config import DEFAULT_SERVED_MODEL_NAME, load_app_config

    int8 = load_app_config({"engine": {"quantization": "int8"}})
    assert int8.served_model_name == f"{DEFAULT_SERVED_MODEL_NAME}-int8"
    assert load_app_config({}).served_model_name == DEFAULT_SERVED_MODEL_NAME
