"""What a request's output must match (structured output): a JSON object, a JSON schema, a regex, or one of
a list of strings. Only the shape is checked here; whether the engine can compile it is the engine's check
(sampling/grammar.py, on its input thread), so a schema it cannot honour is refused naming the request field."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SPEC_CHARS = 64 * 1024  # a schema or regex beyond this is not a structure a response needs
MAX_CHOICES = 256

# The request field each kind comes from, for the error that names it (OpenAI's and vLLM's names).
PARAM_OF_KIND = {
    "json_object": "response_format",
    "json_schema": "response_format",
    "regex": "guided_regex",
    "choice": "guided_choice",
}


class StructuredOutput(BaseModel):
    """`json_object`: any JSON object; `json_schema`: `spec` is the schema as JSON text; `regex`: `spec` is the
    pattern; `choice`: exactly one of `choices`. `strict` (json_schema): no properties beyond the schema's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["json_object", "json_schema", "regex", "choice"]
    spec: str = Field(default="", max_length=MAX_SPEC_CHARS)
    choices: tuple[str, ...] = Field(default=(), max_length=MAX_CHOICES)
    strict: bool = True

    @model_validator(mode="after")
    def _spec_fits_kind(self):
        if self.kind == "choice" and (not self.choices or any(c == "" for c in self.choices)):
            raise ValueError("structured.choices: give at least one non-empty string")
        if self.kind in ("json_schema", "regex") and not self.spec:
            raise ValueError(f"structured.spec: a {self.kind} needs a non-empty spec")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except ValueError as e:
                raise ValueError(f"structured.spec: the schema is not JSON ({e})") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("structured.spec: a JSON schema must be an object")
        return self

    @property
    def param(self) -> str:
        """The request field this came from (the `param` of the error when it cannot be compiled)."""
        return PARAM_OF_KIND[self.kind]

    @property
    def key(self) -> tuple:
        """What identifies the compiled grammar (the compile cache's key)."""
        return (self.kind, self.spec, self.choices, self.strict)
