"""Prompt encoding shared by the engine and the baseline: raw text, token ids, or chat messages."""

from __future__ import annotations

from typing import Any


class RequestError(ValueError):
    """A request the engine cannot serve as given (the message says why, in one line)."""


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
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if not isinstance(prompt, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
        raise RequestError(f"prompt token ids must be a list of integers in [0, {vocab_size})")
    return list(prompt)
