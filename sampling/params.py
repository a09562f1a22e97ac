"""Per-request generation settings, validated on construction so bad input fails with a clear message (the one
formatter of pydantic errors, `describe_validation_error`, lives here: the lowest layer that validates input)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Below this temperature a request is greedy. softmax(logits / T) differs from the argmax's point mass only
# among tokens whose logits lie within about 100 * T of the maximum (any other token weighs under e^-100 of
# the top one), and at T = 1e-5 that band is 1e-3 wide: near-ties that two correct forwards (batched or not,
# other kernels) already order differently. A smaller T only pushes logits / T toward float32 overflow, so
# greedy is the faithful answer there (it is also the usual cut-off of other engines).
MIN_TEMPERATURE = 1e-5

# OpenAI bounds `seed` as a signed 64-bit integer.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class SamplingParams(BaseModel):
    """Greedy when temperature < MIN_TEMPERATURE (0 included); otherwise temperature / top-k / top-p sampling,
    seedable per request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_k: int = Field(default=0, ge=0, description="0 = no top-k cut")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, v):
        return [v] if isinstance(v, str) else v

    @property
    def greedy(self) -> bool:
        """Pick the argmax (see MIN_TEMPERATURE); every greedy branch in the engine and proposers asks this."""
        return self.temperature < MIN_TEMPERATURE


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
