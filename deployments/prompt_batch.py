"""Several choices in one answer: several prompts in one /v1/completions request, as OpenAI allows, and `n` (or
`best_of`) choices per prompt, completions and chat alike. Each prompt is a request of its own to the replicas
(its own ReplicaStream, so each is routed, resumed and cancelled alone) whose n sequences share the prompt's KV
there; choice i * n + j is prompt i's sequence j, as OpenAI indexes them, and the usage counts each prompt once
and sums the choices' tokens. With best_of > n (not streamed) a prompt's n sequences of highest cumulative
logprob are its choices. Streamed, the chunks of all choices interleave as they come, each carrying its choice's
index; the stream ends once every choice has its finish reason (or with an error event), then `data: [DONE]`.

With `echo` each choice starts with its prompt (and, with logprobs, the prompt's logprobs), streamed as its
first chunk. A prompt the engine refuses fails the whole request with a 400 that names it (`prompt.3: ...`).
When the request ends early (an error, a client gone), every prompt's replica-side stream is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.openai_protocol import ProtocolError
from deployments.openai_responses import (
    SSE_DONE,
    SSEEncoder,
    chat_completion_response,
    completion_response,
    sse_event,
    usage_chunk,
)
from deployments.stream_items import DeltaItem, ErrorItem, LogprobEntry, StartItem

# An echoed prompt: its text and, with logprobs, its entries.
Echo = tuple[str, tuple[LogprobEntry, ...] | None]


@dataclass
class Choice:
    """One choice (a prompt's sequence) as it was relayed (`logprobs` None: not asked for); `text` and
    `logprobs` start with the echoed prompt, if any."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[LogprobEntry] | None = None
    cumulative_logprob: float = 0.0

    @classmethod
    def start(cls, logprobs: bool, echo: Echo | None = None) -> Choice:
        choice = cls(logprobs=[] if logprobs else None)
        if echo is not None:
            choice.text.append(echo[0])
            if choice.logprobs is not None:
                choice.logprobs.extend(echo[1] or ())
        return choice

    def add(self, item: DeltaItem) -> None:
        self.text.append(item.text)
        self.token_ids.extend(item.token_ids)
        self.finish_reason = item.finish_reason or self.finish_reason
        if self.logprobs is not None:
            self.logprobs.extend(item.logprobs or ())
        if item.cumulative_logprob is not None:
            self.cumulative_logprob = item.cumulative_logprob


def element_error(error: ProtocolError, index: int | None) -> ProtocolError:
    """A 4xx about the prompt (param `prompt` or none) names the prompt of the batch; others stay as they are (all
    of them when `index` is None: a single prompt)."""
    if index is None or error.status_code >= 500 or error.param not in (None, "prompt"):
        return error
    where = f"prompt.{index}"
    return ProtocolError(f"{where}: {error.message}", status_code=error.status_code, param=where, code=error.code)


def _where(index: int, streams: list[Any]) -> int | None:
    """The prompt index errors name: none when there is one prompt."""
    return index if len(streams) > 1 else None


async def start_all(streams: list[Any]) -> list[StartItem | ErrorItem]:
    """Every stream's first item, the streams started one after another (their first reads, awaited together
    from one request, were seen to hang in Serve now and then); the streams then run concurrently."""
    return [await s.start() for s in streams]


async def _collect(
    stream: Any, index: int | None, to_error: Callable[[ErrorItem], ProtocolError], choices: list[Choice]
) -> list[Choice]:
    async for item in stream.items():
        if isinstance(item, ErrorItem):
            raise element_error(to_error(item), index)
        choices[item.index].add(item)
    return choices


def best_of(choices: list[Choice], n: int) -> list[Choice]:
    """The n choices of highest cumulative logprob, highest first (one prompt's best_of sequences)."""
    return sorted(choices, key=lambda c: c.cumulative_logprob, reverse=True)[:n]


async def collect_all(
    streams: list[Any],
    to_error: Callable[[ErrorItem], ProtocolError],
    sequences: int = 1,
    n: int | None = None,
    logprobs: bool = False,
    echoes: list[Echo] | None = None,
) -> list[Choice]:
    """Every choice's whole text, prompt by prompt (`sequences` per prompt sampled, its best `n` kept; each
    started with its prompt's echo, if any); the first failure (lowest index) is raised once all have stopped,
    the others cancelled."""
    started = [
        [Choice.start(logprobs, echoes[i] if echoes else None) for _ in range(sequences)] for i in range(len(streams))
    ]
    tasks = [asyncio.create_task(_collect(s, _where(i, streams), to_error, started[i])) for i, s in enumerate(streams)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for stream, task in zip(streams, tasks):
            if not task.done():
                stream.cancel()
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    failed = next((t.exception() for t in tasks if not t.cancelled() and t.exception() is not None), None)
    if failed is not None:
        raise failed
    return [c for t in tasks for c in best_of(t.result(), n or sequences)]


def usage_of(prompt_tokens: list[int], choices: list[Choice]) -> dict[str, int]:
    """Summed over the prompts, as OpenAI reports a batch."""
    prompt, completion = sum(prompt_tokens), sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def batch_response(id: str, model: str, choices: list[Choice], usage: dict, created: int, chat: bool = False) -> dict:
    """The `text_completion` (or `chat.completion`) object with its choices in index order."""
    build = chat_completion_response if chat else completion_response
    bodies = [
        build(
            id,
            model,
            "".join(c.text),
            c.finish_reason,
            usage,
            created,
            None if c.logprobs is None else tuple(c.logprobs),
        )
        for c in choices
    ]
    body = bodies[0]
    body["choices"] = [{**b["choices"][0], "index": i} for i, b in enumerate(bodies)]
    return body


async def relay_sse(
    streams: list[Any],
    prompt_tokens: list[int],
    *,
    id: str,
    model: str,
    created: int,
    include_usage: bool,
    to_error: Callable[[ErrorItem], ProtocolError],
    on_error: Callable[[Exception], ProtocolError],
    on_usage: Callable[[dict], None] = lambda usage: None,
    n: int = 1,
    chat: bool = False,
    echoes: list[Echo] | None = None,
) -> AsyncIterator[str]:
    """The choices (`n` per prompt) as one SSE stream. `to_error` maps a replica's error item, `on_error` an
    unexpected failure (it logs and returns the 5xx to send); `on_usage` gets the summed usage of a stream that
    completed; `echoes` (one per prompt) start each of the prompt's choices. Closing this generator cancels every
    prompt's stream."""
    queue: asyncio.Queue[tuple[int, DeltaItem | ErrorItem | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: Any) -> None:
        try:
            async for item in stream.items():
                queue.put_nowait((index, item))
        except Exception as e:  # noqa: BLE001 - relayed: the stream ends with an error event
            queue.put_nowait((index, e))
        else:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    choices = [Choice() for _ in range(len(streams) * n)]
    encoders = [SSEEncoder(id, model, chat, created, include_usage, index=i) for i in range(len(choices))]
    try:
        for i, encoder in enumerate(encoders):
            for event in encoder.start():
                yield event
            if echoes:
                for event in encoder.piece(echoes[i // n][0], None, echoes[i // n][1]):
                    yield event
        left = len(streams)
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
                continue
            if isinstance(item, Exception):
                yield sse_event(on_error(item).body())
                yield SSE_DONE
                return
            if isinstance(item, ErrorItem):
                yield sse_event(element_error(to_error(item), _where(index, streams)).body())
                yield SSE_DONE
                return
            choice = index * n + item.index
            choices[choice].add(item)
            for event in encoders[choice].piece(item.text, item.finish_reason, item.logprobs):
                yield event
        usage = usage_of(prompt_tokens, choices)
        on_usage(usage)
        if include_usage:
            yield sse_event(usage_chunk(id, model, created, usage, chat=chat))
        yield SSE_DONE
    finally:
        for stream, task in zip(streams, tasks):
            stream.cancel()
            task.cancel()
