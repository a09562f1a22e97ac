"""Logprobs laid out as OpenAI's two APIs write them, from the replica's entries (`stream_items.LogprobEntry`).

Chat: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`, the top list `top_logprobs`
long. Completions (the legacy layout): parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a {token:
logprob} map of the top tokens and the chosen one, so up to `logprobs` + 1 entries; null for an echoed prompt's
first token, as `token_logprobs` is) and `text_offset`, each token's character offset in the choice's text,
counted over the tokens' texts and carried across a stream's chunks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from deployments.stream_items import LogprobEntry


def _chat_top(entry: LogprobEntry) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes)}


def chat_logprobs(entries: Iterable[LogprobEntry]) -> dict[str, Any]:
    """A chat choice's (or chunk's) `logprobs`."""
    return {"content": [{**_chat_top(e), "top_logprobs": [_chat_top(t) for t in e.top]} for e in entries]}


class CompletionLogprobs:
    """A completion choice's `logprobs`, piece by piece: `add` lays out the next tokens, offsets continuing."""

    def __init__(self) -> None:
        self.offset = 0

    def add(self, entries: Iterable[LogprobEntry]) -> dict[str, Any]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["tokens"].append(e.token)
            out["token_logprobs"].append(e.logprob)
            top = None
            if e.logprob is not None:
                top = {t.token: t.logprob for t in e.top}
                top.setdefault(e.token, e.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(e.token)
        return out
