"""Choices of several prompts and n sequences each, as the ingress assembles them from replica streams (no Ray)."""

from __future__ import annotations

import asyncio
import json

from deployments.openai_protocol import ProtocolError
from deployments.prompt_batch import batch_response, collect_all, relay_sse, usage_of
from deployments.stream_items import DeltaItem


class FakeStream:
    """A replica stream's deltas of a request with n sequences (interleaved, as the engine emits them)."""

    def __init__(self, items: list[DeltaItem]):
        self._items, self.cancelled = items, False

    async def items(self):
        for item in self._items:
            await asyncio.sleep(0)
            yield item

    def cancel(self) -> None:
        self.cancelled = True


def two_sequences(prefix: str, logprobs: tuple[float, float] = (-1.0, -2.0)) -> FakeStream:
    return FakeStream(
        [
            DeltaItem(f"{prefix}0a", (1,), None, index=0),
            DeltaItem(f"{prefix}1a", (2,), None, index=1),
            DeltaItem(f"{prefix}1b", (3,), "stop", index=1, more=True, cumulative_logprob=logprobs[1]),
            DeltaItem(f"{prefix}0b", (4, 5), "length", index=0, more=False, cumulative_logprob=logprobs[0]),
        ]
    )


def to_error(item):
    return ProtocolError(item.message)


def test_choices_are_indexed_prompt_then_sequence_with_usage_summed():
    choices = asyncio.run(collect_all([two_sequences("p"), two_sequences("q")], to_error, 2))
    assert ["".join(c.text) for c in choices] == ["p0ap0b", "p1ap1b", "q0aq0b", "q1aq1b"]
    assert [c.finish_reason for c in choices] == ["length", "stop"] * 2
    usage = usage_of([7, 9], choices)
    assert usage == {"prompt_tokens": 16, "completion_tokens": 10, "total_tokens": 26}
    body = batch_response("id", "m", choices, usage, 0, chat=True)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["object"] == "chat.completion" and body["choices"][1]["message"]["content"] == "p1ap1b"


def test_best_of_keeps_the_sequences_of_highest_cumulative_logprob():
    streams = [two_sequences("p", (-5.0, -0.5)), two_sequences("q", (-1.0, -3.0))]
    choices = asyncio.run(collect_all(streams, to_error, sequences=2, n=1))
    assert ["".join(c.text) for c in choices] == ["p1ap1b", "q0aq0b"]


async def relay(streams, chat: bool) -> list:
    events = [
        e
        async for e in relay_sse(
            streams,
            [3, 4],
            id="id",
            model="m",
            created=0,
            include_usage=True,
            to_error=to_error,
            on_error=lambda e: ProtocolError(str(e)),
            n=2,
            chat=chat,
        )
    ]
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def test_streamed_choices_each_end_with_their_finish_then_usage_once():
    for chat in (False, True):
        chunks = asyncio.run(relay([two_sequences("p"), two_sequences("q")], chat))
        *pieces, last = chunks
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
        assert all(len(c["choices"]) == 1 for c in pieces)
        finished = sorted(c["choices"][0]["index"] for c in pieces if c["choices"][0]["finish_reason"])
        assert finished == [0, 1, 2, 3]
        if chat:  # every choice starts with its role
            assert [c["choices"][0]["index"] for c in pieces[:4]] == [0, 1, 2, 3]
            assert all(c["choices"][0]["delta"] == {"role": "assistant", "content": ""} for c in pieces[:4])
