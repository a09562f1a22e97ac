"""Per-request generation settings, validated on construction so bad input fails with a clear message."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """Greedy when temperature is 0; otherwise temperature / top-k / top-p sampling, seedable per request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_k: int = Field(default=0, ge=0, description="0 = no top-k cut")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
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
        return self.temperature == 0.0


def describe_validation_error(err) -> str:
    """One line naming each bad field, from a pydantic ValidationError."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "input"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)
