"""The workload plan: per workload class, the drafter, k and candidate count that maximize expected output
tokens per second, from measured numbers (the target's step time by verified rows, each drafter's cost per
proposed token, its acceptance by position on the class's prompts). `specserve profile` measures and writes it;
`speculator: auto` reads it.

A drafter's acceptance is measured as survival: s_j = the share of verification steps whose draft position j was
accepted (steps without a draft count too, so a drafter that often finds nothing scores low). A step with k drafts
then emits 1 + s_0 + ... + s_{k-1} tokens, the cost model's expected tokens with alpha_j = s_j / s_{j-1}, and takes
drafter cost + target step at 1 + k rows (speculator/cost_model.py). A class whose best speedup over plain
decoding is not above 1 gets drafter "none".
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from speculator.cost_model import CostModel, StepTimes
from speculator.workload_class import ClassifierSpec

NONE = "none"
DRAFTERS = ("ngram", "suffix", "draft", "mlp", "eagle")
LEARNED = ("mlp", "eagle")


def drafter_kind(name: str) -> str:
    """The drafter a plan name stands for: the name itself, or KIND of "KIND:LABEL", a learned drafter of its own
    folder (`specserve adapt` distills one per class, e.g. "mlp:class0")."""
    return name.split(":", 1)[0]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Acceptance(_Strict):
    """A drafter's acceptance on one class's prompts: survival by position, over `steps` verification steps."""

    survival: list[float] = Field(default_factory=list)
    steps: int = 0


class DrafterProfile(_Strict):
    seconds_per_token: float = Field(ge=0)  # the drafter's cost per proposed token
    by_class: dict[str, Acceptance] = Field(default_factory=dict)


class ClassChoice(_Strict):
    name: str
    drafter: str = NONE
    k: int = Field(default=0, ge=0)
    candidates: int = Field(default=1, ge=1)
    expected_tokens_per_step: float = 1.0
    expected_speedup: float = 1.0  # expected output tokens/s over plain decoding's
    num_prompts: int = 0


class StepProfile(_Strict):
    rows: list[int]
    seconds: list[float]

    def times(self) -> StepTimes:
        return StepTimes(tuple(self.rows), tuple(self.seconds))


class WorkloadPlan(_Strict):
    classifier: ClassifierSpec
    classes: list[ClassChoice]
    drafter_models: dict[str, str] = Field(default_factory=dict)  # mlp / eagle / KIND:LABEL: the drafter's folder
    step_times: StepProfile
    drafters: dict[str, DrafterProfile] = Field(default_factory=dict)

    def choice(self, name: str) -> ClassChoice:
        return next((c for c in self.classes if c.name == name), ClassChoice(name=name))

    def drafters_used(self) -> list[str]:
        return sorted({c.drafter for c in self.classes if c.drafter != NONE})


def read_plan(path: str | Path) -> WorkloadPlan:
    """The plan file; a ValueError naming the file when it is not one."""
    try:
        plan = WorkloadPlan.model_validate_json(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a workload plan ({str(e).splitlines()[0]})") from None
    unknown = [
        d
        for d in plan.drafters_used()
        if d not in DRAFTERS and not (drafter_kind(d) in LEARNED and d in plan.drafter_models)
    ]
    if unknown or set(c.name for c in plan.classes) - set(plan.classifier.names):
        raise ValueError(f"{path}: unknown drafters {unknown} or classes the classifier does not name")
    return plan


def alphas_from_survival(survival: list[float]) -> list[float]:
    """The cost model's conditional acceptance by position: alpha_j = s_j / s_{j-1}, s_{-1} = 1."""
    out, prev = [], 1.0
    for s in survival:
        out.append(min(1.0, s / prev) if prev > 0 else 0.0)
        prev = s
    return out


def best_choice(
    name: str, step: StepTimes, drafters: dict[str, DrafterProfile], k_max: int, num_prompts: int = 0
) -> ClassChoice:
    """The drafter and k of the highest expected tokens per second for class `name` at batch 1; drafter "none"
    unless that beats plain decoding."""
    plain = CostModel(step, k_max).rate([], 0)
    best = ClassChoice(name=name, num_prompts=num_prompts)
    best_rate = plain
    for drafter in sorted(drafters):
        profile = drafters[drafter]
        acceptance = profile.by_class.get(name)
        if acceptance is None or not acceptance.steps:
            continue
        model = CostModel(step, k_max, draft_seconds_per_token=profile.seconds_per_token)
        alphas = alphas_from_survival(acceptance.survival)
        for k in range(1, min(k_max, len(alphas)) + 1):
            rate = model.rate(alphas[:k], 0)
            if rate > best_rate * (1 + 1e-9):
                best_rate = rate
                best = ClassChoice(
                    name=name,
                    drafter=drafter,
                    k=k,
                    expected_tokens_per_step=round(1 + sum(acceptance.survival[:k]), 4),
                    expected_speedup=round(rate / plain, 4),
                    num_prompts=num_prompts,
                )
    return best


def build_plan(
    classifier: ClassifierSpec,
    step: StepTimes,
    drafters: dict[str, DrafterProfile],
    k_max: int,
    prompts_per_class: dict[str, int] | None = None,
    drafter_models: dict[str, str] | None = None,
) -> WorkloadPlan:
    counts = prompts_per_class or {}
    return WorkloadPlan(
        classifier=classifier,
        classes=[best_choice(n, step, drafters, k_max, counts.get(n, 0)) for n in classifier.names],
        drafter_models=drafter_models or {},
        step_times=StepProfile(rows=list(step.rows), seconds=list(step.seconds)),
        drafters=drafters,
    )
