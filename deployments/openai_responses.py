"""OpenAI-compatible response bodies, stream chunks and SSE framing (requests: `openai_protocol.py`).

Whole bodies (completions, chat completions, model cards) are built and checked with the `openai` package's
own types, once per request, and returned as plain dicts. Stream chunks are plain dicts shaped as OpenAI's:
they are built once per token, and a validated `ChatCompletionChunk` + `model_dump_json` took 15 us per chunk
against 9 us for the dict + `json.dumps` (best of 7 x 20,000 on the 2-core machine); and OpenAI's own
`Completion` type refuses the `finish_reason: null` that every streamed completion chunk but the last carries.
No Ray or FastAPI here.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion import ChoiceLogprobs
from openai.types.completion_choice import Logprobs

from deployments.openai_logprobs import CompletionLogprobs, chat_logprobs
from deployments.stream_items import LogprobEntry

SSE_DONE = "data: [DONE]\n\n"


def new_id(kind: Literal["cmpl", "chatcmpl"]) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _now(created: int | None) -> int:
    return int(time.time()) if created is None else created


def _whole(cls: type, object: str, id: str, model: str, choice: Any, usage: dict, created: int | None) -> dict:
    """A whole response body of one choice, as the `openai` type `cls` writes it."""
    usage_ = CompletionUsage(**usage)
    body = cls(id=id, object=object, created=_now(created), model=model, choices=[choice], usage=usage_)
    return body.model_dump(exclude_unset=True)


def completion_response(
    id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: dict,
    created: int | None = None,
    logprobs: tuple[LogprobEntry, ...] | None = None,
) -> dict:
    """A whole `text_completion` object (`logprobs`: one entry per token of `text`, when asked)."""
    # constructed, not validated: OpenAI's type has no room for the null of an echoed prompt's first token
    laid_out = None if logprobs is None else Logprobs.model_construct(**CompletionLogprobs().add(logprobs))
    choice = CompletionChoice(index=0, text=text, finish_reason=finish_reason, logprobs=laid_out)
    return _whole(Completion, "text_completion", id, model, choice, usage, created)


def chat_completion_response(
    id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: dict,
    created: int | None = None,
    logprobs: tuple[LogprobEntry, ...] | None = None,
) -> dict:
    """A whole `chat.completion` object (`logprobs`: one entry per token of `text`, when asked)."""
    message = ChatCompletionMessage(role="assistant", content=text)
    laid_out = None if logprobs is None else ChoiceLogprobs(**chat_logprobs(logprobs))
    choice = ChatChoice(index=0, message=message, finish_reason=finish_reason, logprobs=laid_out)
    return _whole(ChatCompletion, "chat.completion", id, model, choice, usage, created)


def completion_chunk(
    id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str | None = None,
    include_usage: bool = False,
    logprobs: dict | None = None,
) -> dict:
    """One streamed piece of a completion (OpenAI streams completions as `text_completion` objects)."""
    chunk = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def chat_completion_chunk(
    id: str,
    model: str,
    created: int,
    content: str | None = None,
    finish_reason: str | None = None,
    role: bool = False,
    include_usage: bool = False,
    logprobs: dict | None = None,
) -> dict:
    """One `chat.completion.chunk`; the first of a stream sets `role=True` (delta carries the role)."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    chunk = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(id: str, model: str, created: int, usage: dict, chat: bool) -> dict:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, only usage."""
    return {
        "id": id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }


def sse_event(obj: dict) -> str:
    """One server-sent event; the stream ends with `SSE_DONE`."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class SSEEncoder:
    """The SSE framing of one OpenAI stream, or of its choice `index`, fed piece by piece (works for sync and
    async producers alike): `start()` (the role chunk for chat), `piece(text, finish, logprobs)` per engine
    output, `end(usage)` (the usage chunk if asked for, then [DONE]). A piece's logprobs (one entry per token it
    came from) ride on its text chunk, which is sent, empty if need be, whenever there are any."""

    def __init__(
        self,
        id: str,
        model: str,
        chat: bool,
        created: int | None = None,
        include_usage: bool = False,
        index: int = 0,
    ):
        self.id, self.model, self.chat, self.index = id, model, chat, index
        self.created, self.include_usage = _now(created), include_usage
        self.completion_logprobs = CompletionLogprobs()  # text offsets run across the stream

    def _event(self, chunk: dict) -> str:
        chunk["choices"][0]["index"] = self.index
        return sse_event(chunk)

    def start(self) -> list[str]:
        if not self.chat:
            return []
        chunk = chat_completion_chunk(
            self.id, self.model, self.created, "", role=True, include_usage=self.include_usage
        )
        return [self._event(chunk)]

    def piece(self, text: str, finish: str | None, logprobs: tuple[LogprobEntry, ...] | None = None) -> list[str]:
        if not text and finish is None and not logprobs:
            return []
        args = (self.id, self.model, self.created)
        if not self.chat:
            laid_out = None if logprobs is None else self.completion_logprobs.add(logprobs)
            chunk = completion_chunk(*args, text, finish, include_usage=self.include_usage, logprobs=laid_out)
            return [self._event(chunk)]
        events = []
        if text or logprobs:
            laid_out = None if logprobs is None else chat_logprobs(logprobs)
            chunk = chat_completion_chunk(*args, content=text, include_usage=self.include_usage, logprobs=laid_out)
            events.append(self._event(chunk))
        if finish is not None:
            chunk = chat_completion_chunk(*args, finish_reason=finish, include_usage=self.include_usage)
            events.append(self._event(chunk))
        return events

    def end(self, final_usage: dict | None = None) -> list[str]:
        if not self.include_usage:
            return [SSE_DONE]
        if final_usage is None:
            raise ValueError("include_usage needs final_usage")
        return [sse_event(usage_chunk(self.id, self.model, self.created, final_usage, self.chat)), SSE_DONE]


def sse_stream(
    pieces: Iterable[tuple[str, str | None]],
    *,
    id: str,
    model: str,
    chat: bool,
    created: int | None = None,
    include_usage: bool = False,
    final_usage: dict | Callable[[], dict] | None = None,
) -> Iterator[str]:
    """A whole OpenAI stream as SSE events from (text delta, finish_reason or None) pieces, e.g. the engine's
    outputs or `completion_cache.replay_pieces`: role chunk (chat), text chunks, a finish chunk, the usage
    chunk if asked for (`final_usage` may be a callable, read once the pieces are exhausted), then [DONE]."""
    if include_usage and final_usage is None:
        raise ValueError("include_usage needs final_usage")
    sse = SSEEncoder(id, model, chat, created, include_usage)
    yield from sse.start()
    for text, finish in pieces:
        yield from sse.piece(text, finish)
    yield from sse.end(final_usage() if callable(final_usage) else final_usage)


def model_card(model_id: str, created: int | None = None, owned_by: str = "specserve") -> dict:
    return Model(id=model_id, object="model", created=_now(created), owned_by=owned_by).model_dump(exclude_unset=True)


def model_list(model_ids: list[str], created: int | None = None, owned_by: str = "specserve") -> dict:
    """The body of GET /v1/models."""
    return {"object": "list", "data": [model_card(m, created, owned_by) for m in model_ids]}
