"""`specserve profile`: measure this machine's numbers for `speculator: auto` and write its plan.

The target's step time by verified rows (the cost model's start-up measurement), then per candidate drafter (n-gram,
suffix, a layer-truncated draft model, and the learned drafters given with --speculator-model) its cost per proposed
token and its acceptance by position on the prompts of each workload class: the real engine at a fixed k, greedy,
one prompt at a time, counted by the engine's own per-request speculation counters. The classes are fitted on the
prompts (k-means over the target's mean input-token embeddings) or given as rules. speculator/plan.py turns the
numbers into the plan.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cli.bench import warm
from cli.prompts import PromptSpec, load_prompts
from engine.llm_engine import LLMEngine
from engine.metrics import SpecCounters
from engine.tokenization import encode_prompt
from model.config import EngineConfig
from sampling.params import SamplingParams
from speculator.cost_model import StepTimes, measure_step_times
from speculator.eagle import EagleLoadError, read_eagle_config
from speculator.plan import Acceptance, DrafterProfile, WorkloadPlan, build_plan
from speculator.workload_class import ClassifierSpec, PromptClassifier, fit_kmeans, mean_embedding, read_rules

BASE_DRAFTERS = ("ngram", "suffix", "draft")


@dataclass
class ProfileOptions:
    limit: int | None = None
    max_tokens: int = 64
    k: int = 4
    classes: int | None = None  # k-means classes; None = chosen by silhouette among 2..4
    class_rules: str | None = None  # a JSON list of {name, regex} instead of k-means
    drafters: tuple[str, ...] = BASE_DRAFTERS
    speculator_models: tuple[str, ...] = ()  # learned drafters' folders (KIND=DIR, or DIR: kind read from it)


def learned_kind(item: str) -> tuple[str, str]:
    """("mlp" | "eagle", folder) of a --speculator-model value."""
    if "=" in item and item.split("=", 1)[0] in ("mlp", "eagle"):
        kind, folder = item.split("=", 1)
        return kind, folder
    try:
        read_eagle_config(item)
        return "eagle", item
    except EagleLoadError:
        return "mlp", item


def _timed(engine: LLMEngine, clock: list[float]) -> None:
    """Add the seconds of each proposal and the tokens asked of it to `clock` ([seconds, tokens])."""
    propose = engine.proposer.propose

    def run(requests):
        t0 = time.perf_counter()
        drafts = propose(requests)
        clock[0] += time.perf_counter() - t0
        clock[1] += sum(r.k for r in requests)
        return drafts

    engine.proposer.propose = run


def measure_drafter(
    config: EngineConfig, prompts: list[list[int]], labels: list[str], max_tokens: int
) -> DrafterProfile:
    """One drafter at fixed k on every prompt alone: its seconds per proposed token and, per class, survival by
    position (steps whose position j was accepted over all verification steps)."""
    engine = warm(LLMEngine(config))
    clock = [0.0, 0]
    _timed(engine, clock)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    per_class: dict[str, SpecCounters] = {}
    for ids, label in zip(prompts, labels):
        (out,) = engine.generate([ids], params)
        total = per_class.setdefault(label, SpecCounters())
        spec = out.metrics.spec
        total.steps += spec.steps
        for j, n in enumerate(spec.accepted_per_pos):
            total.accepted_per_pos.extend([0] * (j + 1 - len(total.accepted_per_pos)))
            total.accepted_per_pos[j] += n
    del engine
    gc.collect()
    by_class = {
        name: Acceptance(
            survival=[round(a / c.steps, 6) for a in c.accepted_per_pos]
            + [0.0] * (config.num_speculative_tokens - len(c.accepted_per_pos)),
            steps=c.steps,
        )
        for name, c in per_class.items()
        if c.steps
    }
    return DrafterProfile(seconds_per_token=clock[0] / max(1, clock[1]), by_class=by_class)


@dataclass
class ProfiledPrompts:
    """What every drafter is measured against: the prompts (token ids) and their classes, and the target's step
    time by verified rows."""

    specs: list[PromptSpec]
    prompts: list[list[int]]
    labels: list[str]
    classifier: ClassifierSpec
    step: StepTimes

    def counts(self) -> dict[str, int]:
        return {name: self.labels.count(name) for name in self.classifier.names}

    def of_class(self, name: str) -> ProfiledPrompts:
        keep = [i for i, label in enumerate(self.labels) if label == name]
        return replace(
            self,
            specs=[self.specs[i] for i in keep],
            prompts=[self.prompts[i] for i in keep],
            labels=[name] * len(keep),
        )


def plain_config(base: EngineConfig) -> EngineConfig:
    return base.model_copy(update={"speculator": "none", "speculator_model": None, "plan": None})


def prepare(prompts_path: str, base: EngineConfig, options: ProfileOptions, log=print) -> ProfiledPrompts:
    """Load and classify the prompts (k-means fitted on them, or the rules) and time the target's steps."""
    specs = load_prompts(prompts_path, options.limit)
    if not specs:
        raise ValueError(f"{prompts_path}: no prompts")
    plain = LLMEngine(plain_config(base))
    context = min(128, plain.max_model_len - options.k - 9)
    step = measure_step_times(plain.runner, rows=tuple(range(1, options.k + 2)), context=context)
    log(f"target step seconds by rows: {dict(zip(step.rows, [round(s, 5) for s in step.seconds]))}")
    prompts = [encode_prompt(plain.tokenizer, plain.arch.vocab_size, s.prompt, s.messages) for s in specs]
    if options.class_rules:
        spec = read_rules(options.class_rules)
        classifier = PromptClassifier(spec, None, plain.tokenizer.decode)
        labels = [classifier.classify(ids) for ids in prompts]
    else:
        table = plain.runner.model.embed.weight.detach()[: plain.arch.vocab_size].float()
        center = table.mean(0)
        features = torch.stack([mean_embedding(table, ids, center) for ids in prompts])
        spec, idx = fit_kmeans(features, options.classes)
        labels = [spec.names[i] for i in idx]
    del plain
    gc.collect()
    profiled = ProfiledPrompts(specs, prompts, labels, spec, step)
    log(f"classes: {profiled.counts()}")
    return profiled


def measure_candidates(
    base: EngineConfig,
    profiled: ProfiledPrompts,
    candidates: list[tuple[str, str, str | None]],
    options: ProfileOptions,
    log=print,
) -> tuple[dict[str, DrafterProfile], dict[str, str]]:
    """Each candidate (plan name, drafter kind, folder or None) on the prompts: its profile by plan name, and the
    learned ones' folders by plan name."""
    drafters, models = {}, {}
    for name, kind, folder in candidates:
        config = EngineConfig(
            **{
                **plain_config(base).model_dump(),
                "speculator": kind,
                "speculator_model": folder,
                "num_speculative_tokens": options.k,
                "adaptive_k": False,
                "k_policy": "backoff",
                "num_candidates": 1,
            }
        )
        drafters[name] = measure_drafter(config, profiled.prompts, profiled.labels, options.max_tokens)
        if folder:
            models[name] = str(Path(folder).resolve())
        log(f"{name}: {drafters[name].model_dump_json()}")
    return drafters, models


def candidates_of(options: ProfileOptions) -> list[tuple[str, str, str | None]]:
    learned = [learned_kind(m) for m in options.speculator_models]
    return [(name, name, None) for name in options.drafters] + [(kind, kind, folder) for kind, folder in learned]


def profile(prompts_path: str, base: EngineConfig, options: ProfileOptions, log=print) -> WorkloadPlan:
    profiled = prepare(prompts_path, base, options, log)
    drafters, models = measure_candidates(base, profiled, candidates_of(options), options, log)
    return build_plan(profiled.classifier, profiled.step, drafters, options.k, profiled.counts(), models)


def write_plan(plan: WorkloadPlan, out: str | Path) -> None:
    Path(out).write_text(json.dumps(plan.model_dump(), indent=1) + "\n")


def run(prompts_path: str, out: str, base: EngineConfig, options: ProfileOptions, log=print) -> WorkloadPlan:
    plan = profile(prompts_path, base, options, log)
    write_plan(plan, out)
    return plan
