"""A request's prompt turned into token ids and checked against the model, once (`prepare_request`); the
encoding itself (raw text, token ids, or chat messages) is shared with the baseline.

Everything the engine checks against its model happens here: sampling parameters, vocabulary ids (of the prompt,
`logit_bias` and `stop_token_ids`), the context length and whether one sequence fits the KV cache. What comes
out, an EngineRequest, is what the engine adds without tokenizing or checking anything again. It reads nothing
that changes while the engine runs, so a server prepares requests on a thread of their own: not on its event
loop (a long prompt would stall every stream) and not on the engine thread (it would stall every step).

Chat messages are the caller's text, never the template's: a control token typed into a message
(`<|im_start|>system ...`) is encoded as the plain text it is, so a client cannot forge turns. Only the markers
the chat template writes itself are encoded as control tokens. A raw completion prompt is different: its caller
owns the whole prompt, markers included, so it is encoded as given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jinja2
from pydantic import ValidationError

from sampling.grammar import GrammarCompiler, GrammarError
from sampling.params import SamplingParams, describe_validation_error, field_errors

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class RequestError(ValueError):
    """A request the engine cannot serve as given (the message says why, in one line; `param` names the request
    field at fault when it is not the prompt)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def lone_surrogate(text: str) -> str | None:
    """The first lone UTF-16 surrogate in `text` (not valid Unicode: no tokenizer or encoder takes it), if any."""
    m = _LONE_SURROGATE.search(text)
    return None if m is None else m.group()


def _check_text(text: str, what: str) -> None:
    bad = lone_surrogate(text)
    if bad is not None:
        raise RequestError(f"{what}: contains a lone UTF-16 surrogate (\\u{ord(bad):04x}), which is not valid Unicode")


def encode_chat(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The chat template + generation prompt, with control tokens inside message text encoded as plain text.

    Text without control tokens is encoded exactly as `tokenizer(apply_chat_template(..., tokenize=False))`.
    """
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, sanitize_control_tokens=True, return_dict=False
        )
    except jinja2.TemplateError as e:  # the template's own `raise_exception` (e.g. roles out of order)
        raise RequestError(f"the model's chat template refused these messages: {e}") from None


def encode_prompt(
    tokenizer: Any, vocab_size: int, prompt: str | list[int] | None = None, messages: list[dict] | None = None
) -> list[int]:
    """Token ids for a completion prompt or, with `messages`, the model's chat template + generation prompt."""
    if (prompt is None) == (messages is None):
        raise RequestError("give exactly one of prompt or messages")
    if messages is not None:
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok:
            raise RequestError("messages must be a non-empty list of {role: str, content: str} objects")
        for i, m in enumerate(messages):
            _check_text(m["role"], f"messages.{i}.role")
            _check_text(m["content"], f"messages.{i}.content")
        return encode_chat(tokenizer, messages)
    if isinstance(prompt, str):
        _check_text(prompt, "prompt")
        return tokenizer(prompt)["input_ids"]
    if not isinstance(prompt, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
        raise RequestError(f"prompt token ids must be a list of integers in [0, {vocab_size})")
    return list(prompt)


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against: the vocabulary, the context, and the KV cache one sequence may use."""

    vocab_size: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int


@dataclass(frozen=True)
class EngineRequest:
    """A request as the engine adds it: prompt token ids within the vocabulary and the context, and validated
    sampling parameters."""

    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    # Where the output began, for the logits controls (penalties, min_tokens); None: after the prompt. A request
    # resumed on another replica carries the output already streamed at the end of its prompt.
    output_start: int | None = None
    # The compiled grammar of `params.structured` (xgrammar's CompiledGrammar), None without one.
    grammar: Any = None


def sampling_params(params: SamplingParams | dict | None) -> SamplingParams:
    """`params` as SamplingParams; RequestError naming the bad fields."""
    if isinstance(params, SamplingParams):
        return params
    try:
        return SamplingParams(**(params or {}))
    except ValidationError as e:
        param = next((path for path, _ in field_errors(e) if path), None)
        raise RequestError(describe_validation_error(e), param) from None


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """RequestError naming the first `logit_bias` or `stop_token_ids` id outside the model's vocabulary."""
    for field, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise RequestError(f"{field}: token id {bad} is outside the vocabulary [0, {vocab_size})", field)


def prepare_request(
    tokenizer: Any,
    limits: ModelLimits,
    prompt: str | list[int] | None = None,
    params: SamplingParams | dict | None = None,
    messages: list[dict] | None = None,
    fit_context: bool = False,
    grammars: GrammarCompiler | None = None,
) -> EngineRequest:
    """Encode and check a request; RequestError (one line) for anything the engine cannot serve.

    `fit_context` is the OpenAI API's rule: `max_tokens` must fit the context left after the prompt, and a
    dict without one (or None) takes all of it. Without it a request simply ends with "length" when the
    context is full. A structured-output spec is compiled by `grammars` (each distinct spec once); one it cannot
    compile is a RequestError naming the request field it came from.
    """
    fill = fit_context and isinstance(params, dict) and params.get("max_tokens") is None
    # Checked before tokenizing anything (a missing max_tokens stands for the whole context until it is known).
    sp = sampling_params({**params, "max_tokens": limits.max_model_len} if fill else params)
    check_token_ids(sp, limits.vocab_size)
    ids = encode_prompt(tokenizer, limits.vocab_size, prompt, messages)
    n, context = len(ids), limits.max_model_len
    if not ids:
        raise RequestError("prompt is empty")
    if n >= context:
        raise RequestError(f"prompt has {n} tokens; the model's context is {context} (prompt + output)")
    if -(-(n + 1) // limits.block_size) > limits.num_kv_blocks:
        raise RequestError(f"prompt of {n} tokens does not fit the KV cache; raise kv_cache_gib")
    if fill:
        sp = sampling_params({**params, "max_tokens": context - n})  # min_tokens must fit what is left
    elif fit_context and sp.max_tokens > context - n:
        raise RequestError(
            f"max_tokens={sp.max_tokens} plus the prompt's {n} tokens exceeds the model's context of {context} tokens"
        )
    return EngineRequest(tuple(ids), sp, grammar=compile_grammar(sp, grammars))


def compile_grammar(params: SamplingParams, grammars: GrammarCompiler | None) -> Any:
    """The compiled grammar of `params.structured` (None without one); RequestError naming the field."""
    spec = params.structured
    if spec is None:
        return None
    if grammars is None:
        raise RequestError(f"{spec.param}: structured output is not available in this engine", spec.param)
    try:
        return grammars.compile(spec)
    except GrammarError as e:
        raise RequestError(f"{spec.param}: cannot compile the {spec.kind.replace('_', ' ')}: {e}", spec.param) from None
