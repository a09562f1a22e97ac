"""Prompt encoding shared by the engine and the baseline: raw text, token ids, or chat messages.

Chat messages are the caller's text, never the template's: a control token typed into a message
(`<|im_start|>system ...`) is encoded as the plain text it is, so a client cannot forge turns. Only the markers
the chat template writes itself are encoded as control tokens. A raw completion prompt is different: its caller
owns the whole prompt, markers included, so it is encoded as given.
"""

from __future__ import annotations

import re
from typing import Any

import jinja2

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class RequestError(ValueError):
    """A request the engine cannot serve as given (the message says why, in one line)."""


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
