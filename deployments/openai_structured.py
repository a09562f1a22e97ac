"""The structured-output fields of the OpenAI requests: `response_format` (`text`, `json_object`, `json_schema`)
and vLLM's `guided_json`, `guided_regex` and `guided_choice`, turned into the engine's StructuredOutput.

Only their shape is checked here; whether the engine can compile a schema or regex is the engine's check (a 400
naming `response_format` / `guided_regex` when it cannot)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sampling.structured import MAX_CHOICES, StructuredOutput


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`, OpenAI's shape. `strict` false lets the output carry properties beyond
    the schema's; unset or true it may not."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is 'json_schema'")
        return self


class StructuredOutputFields(BaseModel):
    """Mixed into both request models (completions and chat)."""

    response_format: ResponseFormat | None = None
    # extensions (vLLM's names)
    guided_json: dict[str, Any] | str | None = Field(default=None, description="a JSON schema the output follows")
    guided_regex: str | None = Field(default=None, min_length=1, description="a regex the output matches")
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, min_length=1, max_length=MAX_CHOICES, description="the output is exactly one of these"
    )

    @field_validator("guided_json")
    @classmethod
    def _json_schema_text(cls, v: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        if isinstance(v, str):
            try:
                schema = json.loads(v)
            except ValueError:
                raise ValueError("must be a JSON schema (an object, or its JSON text)") from None
            if not isinstance(schema, dict):
                raise ValueError("must be a JSON schema (an object, or its JSON text)")
        return v

    @model_validator(mode="after")
    def _one_structure(self):
        given = [f for f in ("guided_json", "guided_regex", "guided_choice") if getattr(self, f) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        if len(given) > 1:
            raise ValueError(f"{given[1]}: give only one of {', '.join(given)}")
        return self

    def structured_output(self) -> StructuredOutput | None:
        """What the output must match, as the engine takes it (None: free text)."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return StructuredOutput(kind="json_object")
        if rf is not None and rf.type == "json_schema":
            spec = rf.json_schema
            return StructuredOutput(kind="json_schema", spec=json.dumps(spec.schema_), strict=spec.strict is not False)
        if self.guided_json is not None:
            text = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            return StructuredOutput(kind="json_schema", spec=text)
        if self.guided_regex is not None:
            return StructuredOutput(kind="regex", spec=self.guided_regex)
        if self.guided_choice is not None:
            return StructuredOutput(kind="choice", choices=tuple(self.guided_choice))
        return None

    def structured_kwargs(self) -> dict[str, Any]:
        """`structured=` for SamplingParams, only when the request has one (free-text requests stay as they were,
        also as completion-cache keys)."""
        spec = self.structured_output()
        return {} if spec is None else {"structured": spec.model_dump(mode="json")}
