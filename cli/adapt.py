"""`specserve adapt`: the adaptive loop offline. Profile the prompts with the drafters that need no training, distill
a learned drafter for each class the plan leaves short of a target speedup, on that class's prompts alone, and
profile again with those drafters as candidates of their class.

Writes into DIR: plan-before.json (the cheap drafters' plan), drafters/<class>-<kind>/ (each distilled drafter and
its report.json), plan.json (the final plan: `--speculator auto --plan DIR/plan.json`), adapt.json (per class before
and after) and adapt.png (cli/adapt_chart.py). A distilled drafter enters the plan as "<kind>:<class>" with its own
folder, measured on its class's prompts only; the cheap drafters' measurements and the target's step times are
kept from the first profile, so both plans compare like with like. The drafter is measured on the prompts it was
distilled on, so its acceptance is an in-sample figure: an upper bound for unseen prompts of the class.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cli.adapt_chart import draw
from cli.distill import distill_prompts
from cli.profile import ProfileOptions, candidates_of, measure_candidates, prepare, write_plan
from model.config import EngineConfig
from speculator.distill import DistillOptions
from speculator.plan import NONE, ClassChoice, WorkloadPlan, build_plan


class AdaptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(default="mlp", pattern="^(mlp|eagle)$")
    target_speedup: float = Field(default=1.5, gt=0, description="distill for classes whose plan expects less")
    min_prompts: int = Field(default=2, ge=2, description="a class with fewer prompts is not distilled")


class ClassOutcome(BaseModel):
    name: str
    num_prompts: int
    before: ClassChoice
    after: ClassChoice
    survival_before: list[float]  # the chosen drafter's acceptance by position ([] for none)
    survival_after: list[float]
    distilled: str | None = None  # the drafter's plan name
    skipped: str | None = None  # why no drafter was distilled for the class
    distill_s: float = 0.0


class AdaptReport(BaseModel):
    kind: str
    target_speedup: float
    classes: list[ClassOutcome]
    drafter_seconds_per_token: dict[str, float]
    wall_s: float


def chosen_survival(plan: WorkloadPlan, choice: ClassChoice) -> list[float]:
    profile = plan.drafters.get(choice.drafter)
    acceptance = profile.by_class.get(choice.name) if profile else None
    return acceptance.survival if acceptance and choice.drafter != NONE else []


def run(
    prompts_path: str,
    out_dir: str,
    base: EngineConfig,
    profile_options: ProfileOptions,
    distill_options: DistillOptions,
    options: AdaptOptions,
    log=print,
) -> AdaptReport:
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    profiled = prepare(prompts_path, base, profile_options, log)
    counts = profiled.counts()
    drafters, models = measure_candidates(base, profiled, candidates_of(profile_options), profile_options, log)
    before = build_plan(profiled.classifier, profiled.step, drafters, profile_options.k, counts, models)
    write_plan(before, out / "plan-before.json")
    digest = hashlib.sha256(Path(prompts_path).read_bytes()).hexdigest()
    skipped, distill_s = {}, {}
    for choice in before.classes:
        name, n = choice.name, counts[choice.name]
        if choice.expected_speedup >= options.target_speedup:
            skipped[name] = f"expected speedup {choice.expected_speedup} reaches {options.target_speedup}"
        elif n < options.min_prompts:
            skipped[name] = f"{n} of the {options.min_prompts} prompts distillation needs"
        if name in skipped:
            log(f"{name}: not distilled ({skipped[name]})")
            continue
        folder = out / "drafters" / f"{name}-{options.kind}"
        t0 = time.perf_counter()
        distill_prompts(
            profiled.of_class(name).specs, folder, kind=options.kind, max_tokens=profile_options.max_tokens,
            options=distill_options, engine_config=base, source=f"{prompts_path} ({name})", source_sha256=digest,
        )  # fmt: skip
        learned = f"{options.kind}:{name}"
        more, more_models = measure_candidates(
            base, profiled.of_class(name), [(learned, options.kind, str(folder))], profile_options, log
        )
        drafters |= more
        models |= more_models
        distill_s[name] = round(time.perf_counter() - t0, 2)
    after = build_plan(profiled.classifier, profiled.step, drafters, profile_options.k, counts, models)
    write_plan(after, out / "plan.json")
    outcomes = [
        ClassOutcome(
            name=b.name,
            num_prompts=counts[b.name],
            before=b,
            after=a,
            survival_before=chosen_survival(before, b),
            survival_after=chosen_survival(after, a),
            distilled=None if b.name in skipped else f"{options.kind}:{b.name}",
            skipped=skipped.get(b.name),
            distill_s=distill_s.get(b.name, 0.0),
        )
        for b, a in zip(before.classes, after.classes)
    ]
    report = AdaptReport(
        kind=options.kind,
        target_speedup=options.target_speedup,
        classes=outcomes,
        drafter_seconds_per_token={name: p.seconds_per_token for name, p in drafters.items()},
        wall_s=round(time.perf_counter() - t_start, 2),
    )
    (out / "adapt.json").write_text(report.model_dump_json(indent=1) + "\n")
    draw(before, after, out / "adapt.png")
    return report
