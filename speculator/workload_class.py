"""Workload classes: which kind of prompt a request is, so it gets the drafter that pays for that kind.

Two classifiers, both deterministic and cheap enough for every request: k-means over the target's mean input-token
embedding (a row lookup per prompt token, no forward), fitted on a prompt sample by `fit_kmeans`; or rules, the
first `{name, regex}` whose regex is found in the prompt's text (else the class "other").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OTHER = "other"  # the class of a prompt no rule matches


class ClassRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        return value


class ClassifierSpec(BaseModel):
    """What a classifier needs, as the plan file stores it: k-means centroids (unit length, one per name) or
    rules."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["kmeans", "rules"]
    names: list[str] = Field(min_length=1)
    centroids: list[list[float]] | None = None
    rules: list[ClassRule] | None = None

    @model_validator(mode="after")
    def _check(self) -> ClassifierSpec:
        if len(set(self.names)) != len(self.names):
            raise ValueError("class names must be distinct")
        if self.kind == "kmeans":
            if not self.centroids or len(self.centroids) != len(self.names):
                raise ValueError("kmeans: one centroid per class name")
            if len({len(c) for c in self.centroids}) != 1:
                raise ValueError("kmeans: centroids of one dimension")
        elif self.rules is None or [r.name for r in self.rules] + [OTHER] != self.names:
            raise ValueError(f"rules: names are the rules' names in order, then '{OTHER}'")
        return self


def rules_spec(rules: Sequence[ClassRule]) -> ClassifierSpec:
    names = [r.name for r in rules]
    if OTHER in names:
        raise ValueError(f"rule name '{OTHER}' is reserved for prompts no rule matches")
    return ClassifierSpec(kind="rules", names=[*names, OTHER], rules=list(rules))


def read_rules(path: str | Path) -> ClassifierSpec:
    """A rules file: a JSON list of {name, regex}."""
    from pydantic import TypeAdapter

    rules = TypeAdapter(list[ClassRule]).validate_json(Path(path).read_text())
    if not rules:
        raise ValueError(f"{path}: no rules")
    return rules_spec(rules)


def mean_embedding(table: torch.Tensor, token_ids: Sequence[int], center: torch.Tensor | None = None) -> torch.Tensor:
    """The prompt's mean input-token embedding less `center` (the table's mean row: the direction every prompt
    shares, which would otherwise swamp their differences), scaled to unit length (so length does not count)."""
    ids = torch.as_tensor(list(token_ids) or [0], dtype=torch.long).clamp_(0, table.shape[0] - 1)
    v = table.index_select(0, ids).float().mean(0)
    if center is not None:
        v = v - center
    return v / v.norm().clamp_min(1e-12)


def _kmeans(x: torch.Tensor, k: int, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from a farthest-point start at point 0 (deterministic): (centroids, labels)."""
    centroids = [x[0]]
    for _ in range(1, k):
        d = torch.cdist(x, torch.stack(centroids)).min(1).values
        centroids.append(x[int(d.argmax())])
    c = torch.stack(centroids)
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        if _ and torch.equal(new, labels):
            break
        labels = new
        c = torch.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
    return c, labels


def _silhouette(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    d = torch.cdist(x, x)
    scores = []
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() <= 1:
            scores.append(0.0)
            continue
        a = d[i][own].sum() / (own.sum() - 1)
        b = min(float(d[i][labels == j].mean()) for j in range(k) if j != labels[i] and (labels == j).any())
        scores.append(float((b - a) / max(float(a), b, 1e-12)))
    return sum(scores) / len(scores)


def fit_kmeans(features: torch.Tensor, classes: int | None = None) -> tuple[ClassifierSpec, list[int]]:
    """Classes of the prompts' features [n, d]: `classes` of them, or the k in 2..4 of the best mean silhouette
    (fewer with fewer distinct prompts). Returns the classifier and each prompt's class index."""
    x = features.float()
    distinct = len(torch.unique(x, dim=0))
    if classes is not None:
        if not 1 <= classes <= distinct:
            raise ValueError(f"--classes {classes}: the prompts have {distinct} distinct embeddings")
        ks = [classes]
    else:
        ks = [k for k in (2, 3, 4) if k <= distinct] or [1]
    best = None
    for k in ks:
        c, labels = _kmeans(x, k)
        score = _silhouette(x, labels, k) if k > 1 else 0.0
        if best is None or score > best[0] + 1e-9:
            best = (score, c, labels)
    _, c, labels = best
    spec = ClassifierSpec(kind="kmeans", names=[f"class{i}" for i in range(len(c))], centroids=c.tolist())
    return spec, labels.tolist()


class PromptClassifier:
    """Classifies a request's prompt token ids: `table` is the target's input embedding [V, d] (k-means),
    `decode` turns ids into text (rules)."""

    def __init__(self, spec: ClassifierSpec, table: torch.Tensor | None, decode: Callable[[list[int]], str]):
        self.spec = spec
        self.table = table
        self.decode = decode
        self.centroids = torch.tensor(spec.centroids) if spec.centroids else None
        self.center = table.float().mean(0) if table is not None else None
        self.rules = [(r.name, re.compile(r.regex)) for r in spec.rules or []]
        if self.centroids is not None and (table is None or table.shape[1] != self.centroids.shape[1]):
            raise ValueError("the plan's centroids are not of this model's embedding size")

    def classify(self, token_ids: Sequence[int]) -> str:
        if self.centroids is not None:
            v = mean_embedding(self.table, token_ids, self.center)
            return self.spec.names[int(torch.cdist(v[None], self.centroids).argmin())]
        text = self.decode(list(token_ids))
        return next((name for name, rx in self.rules if rx.search(text)), OTHER)


def embedding_table(folder: Path) -> torch.Tensor:
    """The target's input embedding [V, d], read from its weights (for a process without the model loaded)."""
    from model.loader import iter_weights

    for name, tensor in iter_weights(folder):
        if name == "model.embed_tokens.weight":
            return tensor[...].float()
    raise ValueError(f"{folder}: no model.embed_tokens.weight")
