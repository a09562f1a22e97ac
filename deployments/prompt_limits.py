"""Refuse a prompt that cannot fit the context before tokenizing it (tokenizing megabytes takes seconds).

The bound is exact only for byte-level BPE without a normalizer (GPT-2, Llama 3, SmolLM, Qwen): every byte
of the text is covered by exactly one token, and a token covers at most as many bytes as the longest
vocabulary entry (or added token), so a text of B bytes needs at least ceil(B / N) tokens. For any other
tokenizer (a normalizer may drop or fold characters, an unknown token may cover anything) there is no bound
and nothing is refused here.
"""

from __future__ import annotations

import json
from typing import Any


def max_bytes_per_token(tokenizer: Any) -> int | None:
    """N: the most bytes of text one token can stand for, or None when the tokenizer gives no such bound."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - an unusual backend: no bound
        return None
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        return None
    if model.get("byte_fallback") or model.get("unk_token") is not None:
        return None
    added_tokens = spec.get("added_tokens") or ()
    if any(t.get("lstrip") or t.get("rstrip") for t in added_tokens):  # such a token swallows any whitespace
        return None
    vocab = model.get("vocab") or {}
    longest = max((len(token) for token in vocab), default=0)  # byte-level: one character per byte
    added = (t.get("content", "") for t in added_tokens)
    longest = max([longest, *(len(t.encode("utf-8")) for t in added)])
    return longest or None


def min_tokens(text: str, bytes_per_token: int) -> int:
    """The fewest tokens `text` can be encoded to (see the module docstring)."""
    return -(-len(text.encode("utf-8", "surrogatepass")) // bytes_per_token)
