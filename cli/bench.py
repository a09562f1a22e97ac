"""Benchmark: run a prompt file through specserve or through transformers `generate`, report JSON.

Prompts run in file order; specserve keeps up to `concurrency` requests in flight (a new one joins as soon as
one finishes), the baseline runs them one at a time. Greedy unless a temperature is given.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cli.prompts import PromptSpec, humaneval_to_jsonl, load_prompts, sharegpt_to_jsonl
from engine.llm_engine import DTYPES, LLMEngine
from engine.metrics import SpecCounters
from engine.tokenization import encode_prompt
from model.config import EngineConfig
from model.loader import eos_token_ids, load_arch, load_tokenizer, resolve_model
from sampling.params import SamplingParams


@dataclass
class BenchResult:
    requests: list[dict] = field(default_factory=list)
    spec: SpecCounters = field(default_factory=SpecCounters)
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_json(self, config: dict) -> dict[str, Any]:
        out_tokens = sum(len(r["output_token_ids"]) for r in self.requests)
        ttfts = [r["ttft_s"] for r in self.requests if r["ttft_s"] is not None]
        itls = [r["mean_itl_s"] for r in self.requests if r.get("mean_itl_s") is not None]
        summary = {
            "requests": len(self.requests),
            "output_tokens": out_tokens,
            "wall_s": round(self.wall_s, 3),
            "output_tokens_per_s": round(out_tokens / self.wall_s, 3) if self.wall_s else 0.0,
            "acceptance_rate": round(self.spec.acceptance_rate, 4),
            # Tokens emitted per verification step (1.0 = no speculation), Spec-Bench's "mean accepted tokens".
            "mean_accepted_per_step": round(self.spec.mean_tokens_per_step, 4) if self.spec.steps else 1.0,
            "drafted": self.spec.drafted,
            "accepted": self.spec.accepted,
            "acceptance_by_position": [round(x, 4) for x in self.spec.acceptance_by_position()],
            "mean_ttft_s": round(sum(ttfts) / len(ttfts), 4) if ttfts else None,
            "mean_itl_s": round(sum(itls) / len(itls), 5) if itls else None,
            **self.extra,
        }
        return {"config": config, "summary": summary, "requests": self.requests}


def _params(max_tokens: int, temperature: float, seed: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)


def warm(engine: LLMEngine) -> LLMEngine:
    """A first step outside the measured prompts (as the baseline gets), then counters from zero."""
    engine.generate([[1, 2, 3, 4]], _params(2, 0.0, None))
    engine.spec = SpecCounters()
    return engine


def run_specserve(
    specs: list[PromptSpec],
    config: EngineConfig,
    max_tokens: int,
    concurrency: int,
    temperature: float = 0.0,
    seed: int | None = None,
    engine: LLMEngine | None = None,
    warm_up: bool = True,
) -> BenchResult:
    """`warm_up=False` (an engine already warmed up) also keeps counting into the engine's spec counters."""
    engine = engine or LLMEngine(config)
    params = _params(max_tokens, temperature, seed)
    encoded = [encode_prompt(engine.tokenizer, engine.arch.vocab_size, s.prompt, s.messages) for s in specs]
    result = BenchResult()
    if warm_up:
        warm(engine)
    waste, next_i, done = [], 0, {}
    bar = tqdm(total=len(specs), desc="specserve", unit="req", leave=False)
    start = time.perf_counter()
    while len(done) < len(specs):
        while next_i < len(specs) and len(engine.requests) < concurrency:
            engine.add_request(encoded[next_i], params, request_id=str(next_i))
            next_i += 1
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out
                bar.update(1)
        live = sum(1 for r in engine.requests.values() if r.seq.seq_id in engine.scheduler.tables)
        if live:
            waste.append(engine.kv_waste_slots() / live)
    result.wall_s = time.perf_counter() - start
    bar.close()
    for i, spec in enumerate(specs):
        out = done[i]
        m = out.metrics
        result.requests.append(
            {
                "id": spec.id,
                "prompt_token_ids": out.prompt_token_ids,
                "output_token_ids": out.output_token_ids,
                "text": out.text,
                "finish_reason": out.finish_reason,
                "ttft_s": m.ttft,
                "latency_s": m.latency,
                "mean_itl_s": m.mean_itl,
                "drafted": m.spec.drafted,
                "accepted": m.spec.accepted,
            }
        )
    result.spec = engine.spec
    result.extra = {
        "kv_waste_slots_per_seq_mean": round(sum(waste) / len(waste), 2) if waste else 0.0,
        "kv_waste_slots_per_seq_max": round(max(waste), 2) if waste else 0.0,
        "block_size": engine.config.block_size,
    }
    return result


class _FirstTokenTimer:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


@dataclass
class HFBaseline:
    """transformers `generate`, loaded once, run one prompt at a time."""

    model: Any
    tokenizer: Any
    vocab_size: int
    eos: list[int]
    device: str

    @classmethod
    def load(cls, model: str | None, dtype: str, device: str = "cpu") -> HFBaseline:
        from transformers import AutoModelForCausalLM

        folder = resolve_model(model)
        tokenizer = load_tokenizer(folder)
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype]).to(device).eval()
        eos = sorted(eos_token_ids(folder, tokenizer))
        with torch.inference_mode():  # warm-up
            hf.generate(torch.tensor([[eos[0]] * 4], device=device), max_new_tokens=2, pad_token_id=eos[0])
        return cls(hf, tokenizer, load_arch(folder).vocab_size, eos, device)

    def run(
        self, specs: list[PromptSpec], max_tokens: int, temperature: float = 0.0, seed: int | None = None
    ) -> BenchResult:
        result = BenchResult()
        start = time.perf_counter()
        for spec in tqdm(specs, desc="hf", unit="req", leave=False):
            result.requests.append(self._one(spec, max_tokens, temperature, seed))
        result.wall_s = time.perf_counter() - start
        return result

    def _one(self, spec: PromptSpec, max_tokens: int, temperature: float, seed: int | None) -> dict:
        ids = encode_prompt(self.tokenizer, self.vocab_size, spec.prompt, spec.messages)
        timer = _FirstTokenTimer()
        sample = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        if seed is not None:
            torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([ids], device=self.device),
                max_new_tokens=max_tokens,
                eos_token_id=self.eos,
                pad_token_id=self.eos[0],
                streamer=timer,
                **sample,
            )
        t1 = time.perf_counter()
        new = out[0, len(ids) :].tolist()
        return {
            "id": spec.id,
            "prompt_token_ids": ids,
            "output_token_ids": new,
            "text": self.tokenizer.decode(new, skip_special_tokens=True),
            "ttft_s": (timer.first or t1) - t0,
            "latency_s": t1 - t0,
            "mean_itl_s": (t1 - (timer.first or t1)) / max(len(new) - 1, 1),
            "drafted": 0,
            "accepted": 0,
        }


def run_hf(
    specs: list[PromptSpec],
    model: str | None,
    dtype: str,
    max_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    device: str = "cpu",
) -> BenchResult:
    return HFBaseline.load(model, dtype, device).run(specs, max_tokens, temperature, seed)


def run_alternating(runners: dict[str, Callable[[list[PromptSpec]], BenchResult]], specs: list[PromptSpec]):
    """Every prompt through every runner in turn, one prompt at a time. On a shared machine whose speed
    drifts by tens of percent over minutes, runners compared this way share the drift; run one after the
    other, they would not. Specserve runners must keep their spec counters across calls (warm_up=False)."""
    merged = {name: BenchResult() for name in runners}
    waste: dict[str, list[dict]] = {name: [] for name in runners}
    for spec in specs:
        for name, run in runners.items():
            r, m = run([spec]), merged[name]
            m.requests += r.requests
            m.wall_s += r.wall_s
            m.spec = r.spec
            waste[name].append(r.extra)
    for name, m in merged.items():
        extras = [e for e in waste[name] if e]
        if extras:
            m.extra = {
                "kv_waste_slots_per_seq_mean": round(
                    sum(e["kv_waste_slots_per_seq_mean"] for e in extras) / len(extras), 2
                ),
                "kv_waste_slots_per_seq_max": max(e["kv_waste_slots_per_seq_max"] for e in extras),
                "block_size": extras[0]["block_size"],
            }
    return merged


def standard_prompt_sets(
    humaneval_src: str | Path, humaneval_limit: int, sharegpt_n: int, data: Path
) -> tuple[list[PromptSpec], list[PromptSpec]]:
    """HumanEval chat prompts and the first `sharegpt_n` single-turn ShareGPT prompts, converted once into `data`/
    (sharegpt16.jsonl, or sharegptN.jsonl for more than 16)."""
    data.mkdir(exist_ok=True)
    if not (data / "humaneval.jsonl").exists():
        humaneval_to_jsonl(humaneval_src, data / "humaneval.jsonl")
    count = max(16, sharegpt_n)
    sharegpt = data / f"sharegpt{count}.jsonl"
    if not sharegpt.exists():
        sharegpt_to_jsonl(sharegpt, count)
    return load_prompts(data / "humaneval.jsonl", humaneval_limit), load_prompts(sharegpt, sharegpt_n)


def short_prompts(specs: list[PromptSpec], tokenizer: Any, vocab_size: int, max_tokens: int, n: int):
    """The first `n` of `specs` whose encoded prompt (chat template included) is at most `max_tokens` tokens."""
    short = [s for s in specs if len(encode_prompt(tokenizer, vocab_size, s.prompt, s.messages)) <= max_tokens]
    if len(short) < n:
        raise ValueError(f"only {len(short)} of {len(specs)} prompts are at most {max_tokens} tokens; {n} needed")
    return short[:n]


def print_report(report: dict[str, Any], out: str | None) -> None:
    """The report as indented JSON on stdout, and in `out` if given."""
    text = json.dumps(report, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)
