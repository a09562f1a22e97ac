"""The benchmark harness: alternating runs interleave prompt by prompt and add up exactly; the short-prompt set."""

from __future__ import annotations

import pytest

from cli.bench import BenchResult, run_alternating, short_prompts
from cli.prompts import PromptSpec
from engine.metrics import SpecCounters
from engine.tokenization import encode_prompt


def test_alternating_runs_go_prompt_by_prompt_and_merge_their_results():
    specs = [PromptSpec(id=str(i), prompt=f"p{i}", messages=None) for i in range(3)]
    calls: list[tuple[str, str]] = []
    counters = SpecCounters()

    def runner(name: str, wall: float, waste: float | None):
        def run(batch: list[PromptSpec]) -> BenchResult:
            (spec,) = batch
            calls.append((spec.id, name))
            counters.drafted += 1
            req = {"id": spec.id, "output_token_ids": [1, 2], "ttft_s": 0.1, "mean_itl_s": 0.01}
            extra = (
                {}
                if waste is None
                else {"kv_waste_slots_per_seq_mean": waste, "kv_waste_slots_per_seq_max": 2 * waste, "block_size": 16}
            )
            return BenchResult([req], counters, wall, extra)

        return run

    merged = run_alternating({"a": runner("a", 1.0, None), "b": runner("b", 0.5, 3.0)}, specs)
    assert calls == [(s.id, n) for s in specs for n in ("a", "b")]
    assert merged["a"].wall_s == 3.0 and merged["b"].wall_s == 1.5
    assert [r["id"] for r in merged["b"].requests] == ["0", "1", "2"]
    assert merged["b"].to_json({})["summary"]["output_tokens_per_s"] == 4.0
    assert merged["b"].extra["kv_waste_slots_per_seq_max"] == 6.0 and not merged["a"].extra


def test_short_prompts_keeps_the_first_n_whose_encoded_prompt_fits(tokenizer):
    """The length counted is the prompt as the engine encodes it (chat template included), and too few short
    prompts is an error rather than a smaller set."""
    words = ["hi", "tell me " * 40, "ok", "what " * 3, "why"]
    specs = [PromptSpec(str(i), None, [{"role": "user", "content": w}]) for i, w in enumerate(words)]
    vocab = len(tokenizer)
    lengths = [len(encode_prompt(tokenizer, vocab, None, s.messages)) for s in specs]
    limit = max(lengths[0], lengths[2], lengths[3], lengths[4])
    assert lengths[1] > limit  # the long one is over, the chat template counted in every one
    kept = short_prompts(specs, tokenizer, vocab, limit, 3)
    assert [s.id for s in kept] == ["0", "2", "3"]
    with pytest.raises(ValueError, match="only 4 of 5 prompts"):
        short_prompts(specs, tokenizer, vocab, limit, 5)
