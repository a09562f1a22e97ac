"""A target replica's requests, in process (no Ray): each is tokenized and checked once, by the engine, on its
input thread (never the replica's event loop); a raw prompt that cannot fit is refused before tokenizing; a
resumed request carries its token ids; the stream is typed items, and every error kind reaches HTTP."""

from __future__ import annotations

import asyncio
import threading

import pytest

import engine.tokenization as tokenization
from deployments.stream_items import DeltaItem, ErrorItem, ErrorKind, StartItem

GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    from deployments.llm_server import LLMServer

    replica = LLMServer(
        {"engine": {"kv_cache_gib": 0.05, "max_model_len": 128}, "target": {"block_manager_actor": False}}
    )
    yield replica
    replica.shutdown()
    # nothing of the replica lives on to record metrics into the next Ray this process joins
    assert not [t for t in threading.enumerate() if t.name in ("metrics", "engine-loop")]


@pytest.fixture
def encodes(monkeypatch) -> list[tuple[str, object]]:
    """(thread name, prompt or messages) of every encoding of a request."""
    calls, real = [], tokenization.encode_prompt

    def spy(tokenizer, vocab_size, prompt=None, messages=None):
        calls.append((threading.current_thread().name, prompt if messages is None else messages))
        return real(tokenizer, vocab_size, prompt, messages)

    monkeypatch.setattr(tokenization, "encode_prompt", spy)
    return calls


def run(server, request: dict) -> list:
    async def collect():
        return [item async for item in server.generate(request)]

    return asyncio.run(collect())


def test_a_request_is_tokenized_once_on_the_engines_input_thread(server, encodes):
    messages = [{"role": "user", "content": "Name a colour."}]
    for request in ({"prompt": "Once upon a time"}, {"messages": messages}):
        encodes.clear()
        items = run(server, {**request, "params": GREEDY})
        assert [thread for thread, _ in encodes] == ["engine-inputs_0"]
        start, *deltas = items
        assert isinstance(start, StartItem) and start.prompt_tokens == len(start.prompt_token_ids) > 0
        assert all(isinstance(d, DeltaItem) for d in deltas) and deltas[-1].finish_reason == "length"
        assert sum(len(d.token_ids) for d in deltas) == GREEDY["max_tokens"]
    assert server.stats()["num_running"] == 0


@pytest.mark.parametrize(
    "request_, param, message",
    [
        ({"prompt": [1, 10**9]}, "prompt", "token ids"),
        ({"prompt": "hi", "params": {"max_tokens": 500}}, "prompt", "exceeds the model's context of 128"),
        ({"messages": [{"role": "user", "content": "hi " * 200}]}, "messages", "context is 128"),
        ({"prompt": "hi", "params": {"top_p": 3}}, "top_p", "top_p: input should be"),
    ],
)
def test_requests_the_engine_cannot_serve_are_one_invalid_request_item(server, encodes, request_, param, message):
    (item,) = run(server, request_)
    assert isinstance(item, ErrorItem) and item.kind is ErrorKind.INVALID_REQUEST
    assert item.param == param and message in item.message
    assert len(encodes) <= 1  # bad sampling parameters are refused before any tokenizing


def test_a_raw_prompt_that_cannot_fit_is_refused_before_tokenizing(server, encodes):
    (item,) = run(server, {"prompt": "z" * 60000})
    assert item.kind is ErrorKind.INVALID_REQUEST and "at least" in item.message and "context is 128" in item.message
    assert encodes == []


def test_a_resumed_request_continues_from_its_token_ids_without_tokenizing(server, encodes):
    whole = run(server, {"prompt": "The three primary colours are", "params": GREEDY})
    prompt_ids, deltas = list(whole[0].prompt_token_ids), whole[1:]
    output_ids = [t for d in deltas for t in d.token_ids]
    cut = 3
    sent = "".join(d.text for d in deltas[:cut])
    encodes.clear()
    resumed = run(
        server,
        {
            "prompt_token_ids": prompt_ids,
            "resume": {"output_token_ids": output_ids[:cut], "text": sent},
            "params": GREEDY,
        },
    )
    assert all(isinstance(prompt, list) for _, prompt in encodes)  # token ids, checked, never text encoded
    assert isinstance(resumed[0], StartItem) and list(resumed[0].prompt_token_ids) == prompt_ids
    assert [t for d in resumed[1:] for t in d.token_ids] == output_ids[cut:]
    assert sent + "".join(d.text for d in resumed[1:]) == "".join(d.text for d in deltas)
    spent = run(
        server,
        {"prompt_token_ids": prompt_ids, "resume": {"output_token_ids": output_ids, "text": sent}, "params": GREEDY},
    )
    assert isinstance(spent[0], StartItem) and spent[-1].finish_reason == "length" and not spent[-1].token_ids


@pytest.mark.parametrize(
    "kind, status, code",
    [
        (ErrorKind.INVALID_REQUEST, 400, None),
        (ErrorKind.OVERLOADED, 503, "overloaded"),
        (ErrorKind.ENGINE_FAILED, 503, "engine_error"),
        (ErrorKind.REQUEST_FAILED, 500, "request_failed"),
        (ErrorKind.REPLICA_LOST, 503, "replica_unavailable"),
    ],
)
def test_every_error_kind_has_its_http_status(kind, status, code):
    from deployments.edge import error_headers
    from deployments.ingress import item_error

    error = item_error(ErrorItem(kind, "why", param="prompt" if status == 400 else None), "r-7")
    assert (error.status_code, error.code) == (status, code)
    assert (error.param == "prompt") == (status == 400) and ("r-7" in error.message) == (status >= 500)
    assert ("retry-after" in error_headers(error)) == (status == 503)
