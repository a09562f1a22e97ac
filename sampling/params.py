"""Per-request generation settings, validated on construction so bad input fails with a clear message."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


def describe_validation_error(err) -> str:
    """One line naming each bad field, from a pydantic ValidationError."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "input"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)
