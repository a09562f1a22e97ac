"""The benchmark harness: alternating runs interleave prompt by prompt and add up exactly."""

from __future__ import annotations

from cli.bench import BenchResult, run_alternating
from cli.prompts import PromptSpec
from engine.metrics import SpecCounters


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
