"""Engine greedy output vs Hugging Face transformers `generate`, token for token.

Eight real prompts of varied length (HumanEval chat prompts, a raw completion, and one of over 1,000 tokens
that is prefilled in chunks) run concurrently, with speculation off, with n-gram lookup and with a draft
model. A differing token is accepted only as a numerical tie: HF's top-two logits at the first difference
within 1e-3; at most one such tie is tolerated per configuration.
"""

from __future__ import annotations

import pytest
import torch

from sampling.params import SamplingParams
from tests.conftest import humaneval_prompts

MAX_TOKENS = 32
TIE = 1e-3


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    chats = [[{"role": "user", "content": f"Complete this function:\n{p}"}] for p in humaneval_prompts(6)]
    ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chats]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ids]
    ids.append(tokenizer("The three primary colors are")["input_ids"])
    long_text = "Explain what each of these functions does.\n\n" + "\n\n".join(humaneval_prompts(40)[8:22])
    long = tokenizer(long_text)["input_ids"]
    assert len(long) > 1000
    ids.append(long)
    return ids


def hf_greedy(hf_model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """HF greedy continuations (stopping at EOS like the engine)."""
    eos = hf_model.config.eos_token_id
    out = []
    for ids in prompts:
        with torch.inference_mode():
            g = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                pad_token_id=eos, temperature=None, top_p=None, top_k=None,
            )  # fmt: skip
        out.append(g[0, len(ids) :].tolist())
    return out


@pytest.fixture(scope="module")
def reference(hf_model, prompts) -> list[list[int]]:
    return hf_greedy(hf_model, prompts, MAX_TOKENS)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_gap(hf_model, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0, -1]
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def check_against_reference(hf_model, prompts, reference, outputs) -> None:
    ties = 0
    for ids, ref, out in zip(prompts, reference, outputs):
        got = out.output_token_ids
        i = first_difference(got, ref)
        if i is None:
            continue
        assert i < len(ref) and i < len(got), f"lengths differ without a token difference: {got} vs {ref}"
        gap = top2_gap(hf_model, ids + ref[:i])
        assert gap < TIE, f"token {i} differs ({got[i]} vs HF {ref[i]}) and HF's top-2 gap {gap:.2e} is no tie"
        ties += 1
    assert ties <= 1, f"{ties} numerical ties in {len(prompts)} prompts: not rare"


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"cpu_kernels": False},  # the PyTorch paths (gathered-page attention, oneDNN matmuls), as on CUDA
        {"speculator": "ngram", "num_speculative_tokens": 4},
        {"speculator": "draft", "num_speculative_tokens": 3, "draft_num_layers": 8},
    ],
    ids=["plain", "plain-pytorch", "ngram", "draft"],
)
def test_greedy_matches_hf(make_engine, hf_model, prompts, reference, config):
    engine = make_engine(**config)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    check_against_reference(hf_model, prompts, reference, outputs)
    assert engine.block_manager.stats()["num_free_blocks"] == engine.runner.num_blocks - 1, "KV blocks leaked"
    if config.get("speculator"):
        assert engine.spec.drafted > 0, "speculation never proposed anything"
        assert engine.spec.steps > 0


def test_chunked_prefill_and_small_pool_preemption(make_engine, hf_model, prompts, reference):
    """A pool too small for the batch forces preemption (recompute); outputs stay exact."""
    engine = make_engine(kv_cache_gib=0.02, max_num_batched_tokens=128, speculator="ngram")
    assert engine.runner.num_blocks < 40
    short = [p for p in prompts if len(p) < 600]
    refs = [r for p, r in zip(prompts, reference) if len(p) < 600]
    outputs = engine.generate(short, SamplingParams(max_tokens=MAX_TOKENS))
    check_against_reference(hf_model, short, refs, outputs)
    assert engine.scheduler.num_preemptions > 0, "the pool was not small enough to preempt"
    assert engine.block_manager.stats()["num_free_blocks"] == engine.runner.num_blocks - 1
