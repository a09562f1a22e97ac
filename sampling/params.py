"""Per-request generation settings, validated on construction so bad input fails with a clear message (the one
formatter of pydantic errors, `describe_validation_error`, lives here: the lowest layer that validates input)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sampling.logprobs import MAX_LOGPROBS
from sampling.structured import StructuredOutput

# Below this temperature a request is greedy. softmax(logits / T) differs from the argmax's point mass only
# among tokens whose logits lie within about 100 * T of the maximum (any other token weighs under e^-100 of
# the top one), and at T = 1e-5 that band is 1e-3 wide: near-ties that two correct forwards (batched or not,
# other kernels) already order differently. A smaller T only pushes logits / T toward float32 overflow, so
# greedy is the faithful answer there (it is also the usual cut-off of other engines).
MIN_TEMPERATURE = 1e-5

# OpenAI bounds `seed` as a signed 64-bit integer.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# OpenAI's bounds: penalties in [-2, 2]; logit_bias values in [-100, 100], at most 300 of them.
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_N = 16  # sequences one request may sample from its prompt (`n`, or `best_of` at the API)


class SamplingParams(BaseModel):
    """Greedy when temperature < MIN_TEMPERATURE (0 included); otherwise temperature / top-k / top-p sampling,
    seedable per request. The logits controls (`min_tokens`, `logit_bias`, the penalties: see
    sampling/controls.py) change the distribution before either, so greedy means the argmax after them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=128, ge=1)
    n: int = Field(default=1, ge=1, le=MAX_N, description="sequences sampled from the prompt, its KV shared")
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_k: int = Field(default=0, ge=0, description="0 = no top-k cut")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = Field(default=0, ge=0, description="EOS and stop_token_ids are masked until this many")
    presence_penalty: float = Field(default=0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(default=0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float = Field(default=1.0, gt=0.0, allow_inf_nan=False, description="1 = none")
    # token id -> bias added to its logit (ids are checked against the model's vocabulary by the engine)
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS_ENTRIES)
    # log-probabilities (sampling/logprobs.py): None = not computed; k = that many most likely tokens too
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="of each output token")
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="of each prompt token")
    # what the output must match (sampling/structured.py); the engine compiles it once per distinct spec
    structured: StructuredOutput | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float]) -> dict[int, float]:
        return check_logit_bias(v)

    @model_validator(mode="after")
    def _min_within_max(self):
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens: {self.min_tokens} is more than max_tokens ({self.max_tokens})")
        return self

    @property
    def has_logits_controls(self) -> bool:
        """Whether logits need processing before temperature / top-k / top-p (sampling/controls.py)."""
        return bool(
            self.min_tokens
            or self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )

    @property
    def greedy(self) -> bool:
        """Pick the argmax (see MIN_TEMPERATURE); every greedy branch in the engine and proposers asks this."""
        return self.temperature < MIN_TEMPERATURE


def check_logit_bias(bias: dict[int, float]) -> dict[int, float]:
    """ValueError for a negative token id or a bias outside [-100, 100] (the vocabulary is the engine's check)."""
    for token, value in bias.items():
        if token < 0:
            raise ValueError(f"token id {token} is negative")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValueError(f"bias {value} of token {token} is outside [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
    return bias


def field_errors(err: ValidationError, unknown: str = "unknown field") -> list[tuple[str, str]]:
    """(dotted path, message) per error of a pydantic ValidationError: the one formatting of every layer that
    validates input (sampling parameters, the engine's and the app's config, the OpenAI requests).

    Of the members of a union only the one that got furthest is kept (pydantic puts the member it tried, 'str'
    or 'list[TextPart]', into the location); an unknown key reads `unknown`; a check across fields that names
    its field itself ("field: why") is reported under that field.
    """
    best: dict[tuple, int] = {}  # union site -> longest location among its errors
    for e in err.errors():
        tag = _union_tag_at(e["loc"])
        if tag is not None:
            best[e["loc"][:tag]] = max(best.get(e["loc"][:tag], 0), len(e["loc"]))
    out: list[tuple[str, str]] = []
    for e in err.errors():
        loc = e["loc"]
        tag = _union_tag_at(loc)
        if tag is not None and len(loc) < best[loc[:tag]]:
            continue
        path = ".".join(str(x) for x in loc if not _is_union_tag(x))
        msg = unknown if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        named = _NAMED.match(msg)
        if named and not path:
            path, msg = named.group(1), named.group(2)
        if msg[:2].istitle():  # pydantic's "Field required" reads "field required" after the path
            msg = msg[:1].lower() + msg[1:]
        if (path, msg) not in out:
            out.append((path, msg))
    return out


def describe_validation_error(err: ValidationError, unknown: str = "unknown field") -> str:
    """One line naming each bad field: `path: what is wrong; ...` (see `field_errors`)."""
    return "; ".join(f"{path}: {msg}" if path else msg for path, msg in field_errors(err, unknown)) or "invalid input"


_NAMED = re.compile(r"^([a-z_][a-z0-9_.]*): (.*)$", re.S)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_union_tag(item: Any) -> bool:
    return isinstance(item, str) and (not item.isidentifier() or item[0].isupper() or item in _TYPE_TAGS)


def _union_tag_at(loc: tuple) -> int | None:
    return next((i for i, x in enumerate(loc) if _is_union_tag(x)), None)
