"""The ingress noticing a gone client by itself (client_watch.py), without Ray: the answer being prepared is
cancelled and its cleanup has run; a disconnect sticks for whoever listens next; behind the edge, a `receive`
that fails (Serve's, once its proxy dropped the request) is a disconnect, not a logged failure."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from deployments.client_watch import ClientGone, answer_while_connected, watched_receive
from deployments.edge import Edge, EdgeSettings, RequestTooLarge


class Client:
    """An ASGI `receive` for a request whose body was sent: it blocks until `leave()`, then says disconnect
    (or raises, as Serve's does when the proxy already dropped the request)."""

    def __init__(self, raises: bool = False):
        self.left = asyncio.Event()
        self.raises = raises
        self.waiting = 0  # receive calls still waiting for the client (a watch still reading it)
        self.body_sent = False

    async def receive(self) -> dict:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        self.waiting += 1
        try:
            await self.left.wait()
        finally:
            self.waiting -= 1
        if self.raises:
            raise RuntimeError("the proxy no longer has this request")
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self.left.set()

    async def body_read(self):
        """The request's watched `receive`, its body already read (as the ingress reads it first)."""
        receive = watched_receive(self.receive)
        await receive()
        return receive


class Answer:
    """A long answer that records whether it finished or was cancelled, and that its cleanup ran."""

    def __init__(self, seconds: float):
        self.seconds, self.cleaned_up, self.cancelled = seconds, False, False

    async def run(self) -> str:
        try:
            await asyncio.sleep(self.seconds)
            return "answer"
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits (a stream's cancel)
            self.cleaned_up = True


@pytest.mark.parametrize("raises", [False, True])
def test_a_client_that_leaves_cancels_the_answer_and_its_cleanup_runs_first(raises):
    async def main():
        client, answer = Client(raises), Answer(60)
        receive = await client.body_read()
        asyncio.get_running_loop().call_later(0.05, client.leave)
        with pytest.raises(ClientGone):
            await asyncio.wait_for(answer_while_connected(receive, answer.run()), 5)
        assert answer.cancelled and answer.cleaned_up
        # the disconnect sticks: a streamed response listening next hears it at once
        assert await asyncio.wait_for(receive(), 1) == {"type": "http.disconnect"}

    asyncio.run(main())


def test_an_answer_that_finishes_first_is_returned_and_the_watch_ends():
    async def main():
        client, answer = Client(), Answer(0.01)
        receive = await client.body_read()
        assert await answer_while_connected(receive, answer.run()) == "answer"
        assert not answer.cancelled
        await asyncio.sleep(0)  # the watch's cancellation lands
        assert client.waiting == 0  # nothing is reading the client any more

    asyncio.run(main())


def test_an_answer_that_fails_raises_its_own_error():
    async def main():
        async def fails():
            raise ValueError("bad request")

        receive = await Client().body_read()
        with pytest.raises(ValueError, match="bad request"):
            await answer_while_connected(receive, fails())

    asyncio.run(main())


def test_cancelling_the_caller_cancels_the_answer():
    async def main():
        client, answer = Client(), Answer(60)
        receive = await client.body_read()
        caller = asyncio.ensure_future(answer_while_connected(receive, answer.run()))
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert answer.cancelled and answer.cleaned_up

    asyncio.run(main())


class Stubborn:
    """An answer that takes its cancellation for an ordinary error (what a call failing in the same instant does
    to `asyncio.wait_for` before Python 3.12) and goes on to return a response holding a replica stream."""

    def __init__(self):
        self.freed = False

    async def run(self) -> Stubborn:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # goes on: opens the stream
        return self

    def free(self, answer: Stubborn) -> None:
        self.freed = True


@pytest.mark.parametrize("how", ["client_leaves", "caller_cancelled"])
def test_an_answer_that_finishes_despite_its_cancellation_is_discarded(how):
    async def main():
        client, answer = Client(), Stubborn()
        receive = await client.body_read()
        caller = asyncio.ensure_future(answer_while_connected(receive, answer.run(), discard=answer.free))
        await asyncio.sleep(0.05)
        client.leave() if how == "client_leaves" else caller.cancel()
        with pytest.raises(ClientGone if how == "client_leaves" else asyncio.CancelledError):
            await asyncio.wait_for(caller, 5)
        assert answer.freed  # nobody will send it: what it holds was freed

    asyncio.run(main())


def test_the_body_limit_still_applies_through_the_watch():
    def limit(message):
        if len(message.get("body", b"")) > 1:
            raise RequestTooLarge(1)

    async def main():
        receive = watched_receive(Client().receive, limit)
        with pytest.raises(RequestTooLarge):
            await receive()

    asyncio.run(main())


def test_behind_the_edge_a_failing_receive_ends_a_stream_quietly(caplog):
    """Serve's `receive` raises once its proxy dropped the request: a streamed response listening for the
    disconnect ends (its generator cleaned up), and the edge logs no failure for an ordinary disconnect."""
    app = FastAPI()
    closed = asyncio.Event()

    @app.post("/v1/completions")
    async def completions(request: Request):
        await request.body()

        async def events():
            try:
                while True:
                    yield "data: {}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                closed.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    edge = Edge(app, settings=lambda: EdgeSettings(max_body_bytes=1 << 20))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    sent = []

    async def send(message):
        sent.append(message)

    async def main():
        client = Client(raises=True)
        asyncio.get_running_loop().call_later(0.1, client.leave)
        await asyncio.wait_for(edge(scope, client.receive, send), 5)
        assert closed.is_set()

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(main())
    assert sent[0]["status"] == 200 and len(sent) > 2  # it streamed until the client was gone
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
