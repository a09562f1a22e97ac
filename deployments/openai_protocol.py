"""OpenAI-compatible request models, request parsing and error bodies (responses: `openai_responses.py`).

Plain pydantic and dicts, no Ray or FastAPI: the HTTP shell parses a body with `parse_request`, turns it into
engine arguments with `sampling_kwargs()` / `engine_prompt()`, and writes back what `openai_responses` builds.
Requests forbid unknown fields (a typo must not be silently ignored) and reject, with a 400 naming the field,
every OpenAI option the engine cannot honour instead of pretending to. Every body that fails to decode is a 400
too: not UTF-8, not JSON, nested too deeply, numbers beyond what a field can hold, NaN / Infinity, and strings
with lone UTF-16 surrogates (which no tokenizer or encoder takes); nothing past `parse_request` sees them.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from deployments.openai_structured import StructuredOutputFields
from engine.tokenization import lone_surrogate
from sampling.logprobs import MAX_LOGPROBS
from sampling.params import (
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_N,
    MAX_PENALTY,
    check_logit_bias,
    describe_validation_error,
    field_errors,
)

# OpenAI's defaults: sampling at temperature 1 unless the client asks otherwise.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
# OpenAI's integers are int64; nothing wider reaches the engine (torch seeds, token ids).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_JSON_DEPTH = 64  # no request of this API nests deeper than a few levels
MAX_INT_DIGITS = 64  # wider than any field takes, far below Python's 4,300-digit conversion limit
UNKNOWN_FIELD = "unknown field (not part of this API)"
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit of /v1/completions' `logprobs` (chat's `top_logprobs`: MAX_LOGPROBS)


class ProtocolError(Exception):
    """A request the API answers with an OpenAI-shaped error body and an HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status_code, self.type, self.param, self.code = message, status_code, type, param, code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def encodable(text: str) -> str:
    """`text` with anything UTF-8 cannot encode (lone surrogates) escaped: an error must never fail to encode."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """`{"error": {...}}` exactly as OpenAI returns it, so clients surface the message."""
    param = None if param is None else encodable(param)
    return {"error": {"message": encodable(message), "type": type, "param": param, "code": code}}


def validation_error(err: ValidationError) -> ProtocolError:
    """A 400 naming the offending field(s); `param` is the first one, as OpenAI reports a single param."""
    errors = field_errors(err, unknown=UNKNOWN_FIELD)
    first = next((path for path, _ in errors if path), None)
    return ProtocolError(describe_validation_error(err, unknown=UNKNOWN_FIELD), param=first)


class _BadNumber(ValueError):
    """A JSON number no field can take (raised from the decoder's number hooks)."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _BadNumber(f"an integer in the body has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"the number {text[:40]} is beyond the range of a double")
    return value


def _parse_constant(text: str) -> float:
    raise _BadNumber(f"{text} is not a JSON number")


def decode_json(body: bytes | str) -> Any:
    """The JSON value of a body; a ProtocolError (400) for anything that is not strict UTF-8 JSON that fits
    (as Python would otherwise raise RecursionError on deep nesting and ValueError on 5,000-digit integers)."""
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"the request body is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    try:
        return json.loads(body, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError:
        raise ProtocolError(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except _BadNumber as e:
        raise ProtocolError(f"could not parse the JSON body of the request: {e}") from None
    except json.JSONDecodeError as e:
        raise ProtocolError(f"could not parse the JSON body of the request: {e}") from None
    except ValueError:
        raise ProtocolError("could not parse the JSON body of the request: a number is out of range") from None


def check_json_value(value: Any) -> None:
    """400 for a decoded body nested deeper than MAX_JSON_DEPTH or holding a string (or key) with a lone
    surrogate, naming where. Iterative, so it cannot itself run out of stack."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise ProtocolError(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, str):
            bad = lone_surrogate(item)
            if bad is not None:
                where = ".".join(path) or "body"
                raise ProtocolError(
                    f"{where}: contains a lone UTF-16 surrogate (\\u{ord(bad):04x}), which is not valid Unicode",
                    param=where if path else None,
                )
        elif isinstance(item, dict):
            for key, child in item.items():
                if lone_surrogate(key) is not None:
                    raise ProtocolError(
                        f"{'.'.join((*path, encodable(key)))}: a key contains a lone UTF-16 surrogate, which is not "
                        "valid Unicode"
                    )
                if isinstance(child, (str, dict, list)):
                    stack.append((child, (*path, key)))
        elif isinstance(item, list):
            for i, child in enumerate(item):
                if isinstance(child, (str, dict, list)):
                    stack.append((child, (*path, str(i))))


def parse_request(model: type[BaseModel], body: bytes | str | dict) -> Any:
    """Decode and validate a request body; every failure is a ProtocolError (400)."""
    if isinstance(body, (bytes, str)):
        body = decode_json(body)
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    check_json_value(body)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    except RecursionError:
        raise ProtocolError(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep") from None


def _quoted(text: str, limit: int = 80) -> str:
    return encodable(text if len(text) <= limit else text[:limit] + "...")


def check_model(requested: str, served: list[str]) -> None:
    """404 `model_not_found`, as OpenAI answers a request for a model it does not serve."""
    if requested not in served:
        raise ProtocolError(
            f"The model `{_quoted(requested)}` does not exist; served: {', '.join(served)}",
            status_code=404,
            param="model",
            code="model_not_found",
        )


# ---- requests -------------------------------------------------------------------------------------------


def _only(*values: Any) -> Any:
    """An option the engine cannot honour: these are the only values it accepts (the first is the default),
    documented in the JSON schema (OpenAPI); any other is a 400 with the reason in `_UNSUPPORTED`."""
    return Field(default=values[0], json_schema_extra={"enum": list(values)})


# Why each `_only` option refuses every other value (one validator checks them all, on whichever model has them).
_UNSUPPORTED = {
    "suffix": "suffix is not supported",
    "tools": "tools are not supported",
}


_NonEmpty = Annotated[str, Field(min_length=1)]
_Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted and ignored: chunks carry no obfuscation padding


class _BaseRequest(StructuredOutputFields):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N, description="choices sampled from the prompt (its KV shared)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: _NonEmpty | list[_NonEmpty] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    user: str | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    logit_bias: dict[str, float] | None = Field(
        default=None,
        max_length=MAX_LOGIT_BIAS_ENTRIES,
        description="token id (as a string) -> bias in [-100, 100] added to its logit",
    )
    # extensions (vLLM's names)
    top_k: int | None = Field(default=None, ge=-1, le=INT64_MAX, description="-1 or 0 = no top-k cut")
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] | None = None
    min_tokens: int | None = Field(default=None, ge=0, le=INT64_MAX, description="EOS and stop ids masked until then")
    repetition_penalty: float | None = Field(default=None, gt=0.0, description="1 = none; > 1 discourages repeats")

    @field_validator(*_UNSUPPORTED, check_fields=False)
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        if v not in cls.model_fields[info.field_name].json_schema_extra["enum"]:
            raise ValueError(_UNSUPPORTED[info.field_name])
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            bad = next((k for k in v if not (k.isascii() and k.isdigit() and len(k) <= MAX_INT_DIGITS)), None)
            if bad is not None:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {_quoted(bad)!r}")
            check_logit_bias({int(k): b for k, b in v.items()})
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, v: Any) -> Any:
        if v is None:
            return v
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("must be a string or a list of strings")
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (non-streaming responses always carry usage)."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `sampling.params.SamplingParams`.

        `max_tokens` is None when the client gave none: the caller fills in the context left after the prompt,
        which only it knows (it has the tokenizer and the model's length).
        """
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        n = {"n": self.num_sequences} if self.num_sequences > 1 else {}  # n = 1 keys stay as they were
        return {
            "max_tokens": self._max_tokens(),
            "temperature": DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            "top_p": DEFAULT_TOP_P if self.top_p is None else self.top_p,
            "top_k": max(self.top_k or 0, 0),
            "seed": self.seed,
            "stop": stop,
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "min_tokens": self.min_tokens or 0,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "logit_bias": {int(k): b for k, b in (self.logit_bias or {}).items()},
            **n,
            **self.structured_kwargs(),
        }

    @property
    def num_sequences(self) -> int:
        """Sequences the engine samples per prompt (`best_of` of a completion, else `n`)."""
        return self.n


MAX_PROMPTS = 128  # prompts in one /v1/completions request (each is a request of its own to the replicas)


def _one_prompt(v: Any, where: str) -> str | list[int]:
    """A string or a list of token ids; ValueError("<where>: why") naming the prompt otherwise."""
    if isinstance(v, str):
        if not v:
            raise ValueError(f"{where}: must not be empty")
        return v
    if isinstance(v, list):
        if not v:
            raise ValueError(f"{where}: must not be empty")
        if all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT64_MAX for t in v):
            return v
        raise ValueError(f"{where}: a token-id prompt must be a list of non-negative integers")
    raise ValueError(f"{where}: must be a string or a list of token ids")


def _normalize_prompt(v: Any) -> str | list[int] | list[str | list[int]]:
    """A string, token ids, or a list of those (a batch: one choice each, in order); a batch of one is
    unwrapped. A bad element is named by its index (`prompt.3`)."""
    if isinstance(v, list) and v and isinstance(v[0], (str, list)):
        if len(v) > MAX_PROMPTS:
            raise ValueError(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        batch = [_one_prompt(p, f"prompt.{i}") for i, p in enumerate(v)]
        return batch[0] if len(batch) == 1 else batch
    if isinstance(v, (str, list)):
        return _one_prompt(v, "prompt")
    raise ValueError("prompt: must be a string, a list of token ids, or a list of those")


_TokenIds = Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1)]
_Prompt = Annotated[str, Field(strict=True, min_length=1)] | _TokenIds


class CompletionRequest(_BaseRequest):
    """POST /v1/completions."""

    prompt: _Prompt | list[_Prompt]
    logprobs: Annotated[int, Field(strict=True)] | None = Field(  # strict: `true` is no count
        default=None, ge=0, le=MAX_COMPLETION_LOGPROBS, description="the chosen tokens' logprobs and this many top"
    )
    echo: bool = Field(default=False, description="prepend the prompt (and its logprobs, with logprobs) to the text")
    suffix: str | None = _only(None, "")
    best_of: int | None = Field(
        default=None, ge=1, le=MAX_N, description="sequences sampled; the n of highest cumulative logprob returned"
    )

    @model_validator(mode="after")
    def _best_of_covers_n(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of: must be at least n ({self.n}), got {self.best_of}")
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise ValueError("best_of: cannot stream when best_of is more than n")
        return self

    @property
    def num_sequences(self) -> int:
        return self.best_of or self.n

    @model_validator(mode="before")
    @classmethod
    def _check_prompt(cls, data: Any) -> Any:
        if isinstance(data, dict) and "prompt" in data:
            data = {**data, "prompt": _normalize_prompt(data["prompt"])}
        return data

    def sampling_kwargs(self) -> dict[str, Any]:
        kwargs = super().sampling_kwargs()
        if self.logprobs is not None:
            kwargs["logprobs"] = self.logprobs
            if self.echo:
                kwargs["prompt_logprobs"] = self.logprobs
        return kwargs

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request, in choice order (one unless a batch was sent)."""
        batch = isinstance(self.prompt, list) and not isinstance(self.prompt[0], int)
        return list(self.prompt) if batch else [self.prompt]

    def engine_prompt(self) -> dict[str, Any]:
        """`prompt=` for `LLMEngine.add_request` / `encode` (the first prompt of a batch; see `prompts`)."""
        return {"prompt": self.prompts[0]}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


def _normalize_content(v: Any) -> Any:
    """Text only: a string, or a list of {"type": "text", "text": ...} parts (images etc. are refused)."""
    if isinstance(v, list):
        for i, part in enumerate(v):
            if not isinstance(part, dict):
                raise ValueError(f"content part {i} must be an object")
            if part.get("type") != "text":
                raise ValueError(f"content part {i}: only text parts are supported, got type {part.get('type')!r}")
        return v
    if isinstance(v, str):
        return v
    raise ValueError("must be a string or a list of text parts")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, v: Any) -> Any:
        return _normalize_content(v)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_BaseRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(strict=True)] | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true"
    )
    tools: list[dict] | None = _only(None, [])
    tool_choice: Literal["none"] | None = None

    @model_validator(mode="after")
    def _one_limit(self):
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise ValueError("max_completion_tokens: disagrees with max_tokens; give only one of them")
        return self

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: only allowed when logprobs is true")
        return self

    def sampling_kwargs(self) -> dict[str, Any]:
        kwargs = super().sampling_kwargs()
        if self.logprobs:
            kwargs["logprobs"] = self.top_logprobs or 0
        return kwargs

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def engine_messages(self) -> list[dict[str, str]]:
        """Messages as the engine's chat template takes them: {role, content: str}; 'developer' is 'system'."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def engine_prompt(self) -> dict[str, Any]:
        """`messages=` for `LLMEngine.add_request` / `encode`."""
        return {"messages": self.engine_messages()}
