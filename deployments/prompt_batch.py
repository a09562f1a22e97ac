"""Several prompts in one /v1/completions request, as OpenAI allows: each prompt is a request of its own to the
replicas (its own ReplicaStream, so each is routed, resumed and cancelled alone), and the answer holds one choice
per prompt, indexed in prompt order, with the usage summed. Streamed, the chunks of all prompts interleave as
they come, each carrying its choice's index; the stream ends once every choice has its finish reason (or with
an error event), then `data: [DONE]`.

With `echo` each choice starts with its prompt (and, with logprobs, the prompt's logprobs), streamed as its
first chunk. A prompt the engine refuses fails the whole request with a 400 that names it (`prompt.3: ...`). When the
request ends early (an error, a client gone), every prompt's replica-side stream is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.openai_logprobs import CompletionLogprobs
from deployments.openai_protocol import ProtocolError
from deployments.openai_responses import SSE_DONE, completion_chunk, completion_response, sse_event, usage_chunk
from deployments.stream_items import DeltaItem, ErrorItem, LogprobEntry, StartItem

# An echoed prompt: its text and, with logprobs, its entries.
Echo = tuple[str, tuple[LogprobEntry, ...] | None]


@dataclass
class Choice:
    """One prompt's completion as it was relayed (`logprobs` None: not asked for); `text` and `logprobs` start
    with the echoed prompt, if any."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[LogprobEntry] | None = None

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


def element_error(error: ProtocolError, index: int) -> ProtocolError:
    """A 4xx about the prompt (param `prompt` or none) names the prompt of the batch; others stay as they are."""
    if error.status_code >= 500 or error.param not in (None, "prompt"):
        return error
    where = f"prompt.{index}"
    return ProtocolError(f"{where}: {error.message}", status_code=error.status_code, param=where, code=error.code)


async def start_all(streams: list[Any]) -> list[StartItem | ErrorItem]:
    """Every stream's first item, the streams started one after another (their first reads, awaited together
    from one request, were seen to hang in Serve now and then); the streams then run concurrently."""
    return [await s.start() for s in streams]


async def _collect(stream: Any, index: int, to_error: Callable[[ErrorItem], ProtocolError], choice: Choice) -> Choice:
    async for item in stream.items():
        if isinstance(item, ErrorItem):
            raise element_error(to_error(item), index)
        choice.add(item)
    return choice


async def collect_all(
    streams: list[Any], to_error: Callable[[ErrorItem], ProtocolError], choices: list[Choice] | None = None
) -> list[Choice]:
    """Every prompt's whole completion, into `choices` (as started: logprobs, echo); the first failure (lowest
    index) is raised once all have stopped, the others cancelled."""
    choices = choices or [Choice() for _ in streams]
    tasks = [asyncio.create_task(_collect(s, i, to_error, c)) for i, (s, c) in enumerate(zip(streams, choices))]
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
    return [t.result() for t in tasks]


def usage_of(prompt_tokens: list[int], choices: list[Choice]) -> dict[str, int]:
    """Summed over the prompts, as OpenAI reports a batch."""
    prompt, completion = sum(prompt_tokens), sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def batch_response(id: str, model: str, choices: list[Choice], usage: dict, created: int) -> dict:
    """The `text_completion` object with one choice per prompt, in prompt order."""
    bodies = [
        completion_response(
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


def _chunk(
    id: str, model: str, created: int, index: int, item: DeltaItem, include_usage: bool, offsets: CompletionLogprobs
) -> str:
    logprobs = None if item.logprobs is None else offsets.add(item.logprobs)
    chunk = completion_chunk(
        id, model, created, item.text, item.finish_reason, include_usage=include_usage, logprobs=logprobs
    )
    chunk["choices"][0]["index"] = index
    return sse_event(chunk)


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
    echoes: list[Echo] | None = None,
) -> AsyncIterator[str]:
    """The batch as one SSE stream. `to_error` maps a replica's error item, `on_error` an unexpected failure
    (it logs and returns the 5xx to send); `on_usage` gets the summed usage of a stream that completed; `echoes`
    (one per prompt) are sent first. Closing this generator cancels every prompt's stream."""
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
    choices = [Choice() for _ in streams]
    offsets = [CompletionLogprobs() for _ in streams]  # text offsets per choice
    try:
        for index, (text, logprobs) in enumerate(echoes or ()):
            yield _chunk(id, model, created, index, DeltaItem(text, (), None, logprobs), include_usage, offsets[index])
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
                yield sse_event(element_error(to_error(item), index).body())
                yield SSE_DONE
                return
            choices[index].add(item)
            if item.text or item.finish_reason is not None or item.logprobs:
                yield _chunk(id, model, created, index, item, include_usage, offsets[index])
        usage = usage_of(prompt_tokens, choices)
        on_usage(usage)
        if include_usage:
            yield sse_event(usage_chunk(id, model, created, usage, chat=False))
        yield SSE_DONE
    finally:
        for stream, task in zip(streams, tasks):
            stream.cancel()
            task.cancel()
