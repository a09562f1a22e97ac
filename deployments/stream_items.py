"""What a replica streams to the ingress for one request: a start item, then deltas, or one error item.

Plain frozen dataclasses, shared by both sides (they travel through Ray as they are). HTTP is the ingress's
business: an error item says what kind of failure it is, and the ingress maps the kind to the status code,
the OpenAI error code and Retry-After (`ingress.item_error`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class LogprobEntry:
    """A token as text (its UTF-8 `bytes` exactly, `token` decoded from them) with its log-probability, and at
    a scored position the most likely tokens, most likely first. `logprob` is None for a prompt's first token,
    which nothing scores."""

    token: str
    bytes: tuple[int, ...]
    logprob: float | None
    top: tuple[LogprobEntry, ...] = ()


@dataclass(frozen=True)
class StartItem:
    """The replica took the request. It carries the prompt's token ids, so that the ingress can resume the
    request on another replica from them if this one dies (resume.py); with `echo` asked, the prompt's text,
    and with prompt logprobs asked, one entry per prompt token."""

    prompt_token_ids: tuple[int, ...]
    replica: str
    prompt_text: str | None = None
    prompt_logprobs: tuple[LogprobEntry, ...] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class DeltaItem:
    """New text and the tokens it came from (with their logprobs, one per token, when asked), of the request's
    sequence `index` (n > 1: their deltas interleave); a sequence's last delta has its finish reason (and its
    cumulative logprob, for best_of), and the stream ends with the delta after which no sequence runs (`more`
    False)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    logprobs: tuple[LogprobEntry, ...] | None = None
    index: int = 0
    more: bool = False  # other sequences of the request still run (only with a finish reason)
    cumulative_logprob: float | None = None  # with a finish reason

    @property
    def ends_stream(self) -> bool:
        return self.finish_reason is not None and not self.more


class ErrorKind(enum.Enum):
    """Why a request ended without output."""

    INVALID_REQUEST = "invalid_request"  # the engine cannot serve it as given (the message names the field)
    OVERLOADED = "overloaded"  # the replica refused it: its queue or KV cache is full
    ENGINE_FAILED = "engine_failed"  # the engine failed with it in flight and could not recover
    REQUEST_FAILED = "request_failed"  # it failed alone in the engine; the others went on
    REPLICA_LOST = "replica_lost"  # its replica died and no other took it over in time


@dataclass(frozen=True)
class ErrorItem:
    """The one error item of a stream, first or last. `message` is a fixed one-line text (the details go to
    the replica's log); `param` names the request field a 400 is about."""

    kind: ErrorKind
    message: str
    param: str | None = None
    retry_after_s: int | None = None


StreamItem = StartItem | DeltaItem | ErrorItem
