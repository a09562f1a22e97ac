"""OpenAI response bodies, stream chunks, SSE framing, errors and the OpenAPI document, as clients parse them."""

from __future__ import annotations

import json

import pytest

from deployments.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    check_model,
    error_body,
)
from deployments.openai_responses import (
    SSE_DONE,
    SSEEncoder,
    chat_completion_chunk,
    chat_completion_response,
    completion_chunk,
    completion_response,
    model_list,
    sse_event,
    sse_stream,
    usage,
    usage_chunk,
)
from deployments.stream_items import LogprobEntry


def test_usage_totals():
    assert usage(12, 5) == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def test_completion_and_chat_objects_have_openai_shape():
    u = usage(3, 2)
    c = completion_response("cmpl-1", "m", "text", "length", u, created=7)
    assert c["object"] == "text_completion" and c["created"] == 7 and c["usage"] == u
    assert c["choices"] == [{"index": 0, "text": "text", "finish_reason": "length", "logprobs": None}]
    chat = chat_completion_response("chatcmpl-1", "m", "hello", "stop", u, created=7)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert chat["choices"][0]["finish_reason"] == "stop"


def test_openai_client_types_parse_our_objects():
    openai = pytest.importorskip("openai")
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    u = usage(3, 2)
    Completion.model_validate(completion_response("cmpl-1", "m", "t", "stop", u))
    ChatCompletion.model_validate(chat_completion_response("chatcmpl-1", "m", "t", "stop", u))
    first = ChatCompletionChunk.model_validate(chat_completion_chunk("c", "m", 1, content="", role=True))
    assert first.choices[0].delta.role == "assistant"
    last = ChatCompletionChunk.model_validate(usage_chunk("c", "m", 1, u, chat=True))
    assert last.usage.total_tokens == 5 and last.choices == []
    # OpenAI streams completions as `text_completion` objects (null finish_reason until the last piece)
    Completion.model_validate(completion_chunk("c", "m", 1, "piece", finish_reason="stop"))
    assert openai.__version__


def test_chunks_and_usage_null_until_the_last():
    chunk = chat_completion_chunk("c", "m", 1, content="hi", include_usage=True)
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert chunk["choices"][0]["delta"] == {"content": "hi"}
    end = chat_completion_chunk("c", "m", 1, finish_reason="stop")
    assert end["choices"][0]["delta"] == {} and "usage" not in end
    text = completion_chunk("c", "m", 1, "x", finish_reason="length", include_usage=True)
    assert text["object"] == "text_completion" and text["choices"][0]["finish_reason"] == "length"
    assert usage_chunk("c", "m", 1, usage(1, 1), chat=False)["object"] == "text_completion"


def test_sse_framing():
    event = sse_event({"a": "é", "b": [1]})
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[len("data: ") :]) == {"a": "é", "b": [1]}
    assert SSE_DONE == "data: [DONE]\n\n"


def test_error_body_and_model_list_shapes():
    assert error_body("nope", param="prompt") == {
        "error": {"message": "nope", "type": "invalid_request_error", "param": "prompt", "code": None}
    }
    models = model_list(["a", "b"], created=5)
    assert models["object"] == "list"
    assert models["data"][1] == {"id": "b", "object": "model", "created": 5, "owned_by": "specserve"}


def test_unknown_model_is_a_404_model_not_found():
    check_model("m", ["m"])
    with pytest.raises(ProtocolError) as info:
        check_model("gpt-4", ["m"])
    assert info.value.status_code == 404
    assert info.value.body()["error"]["code"] == "model_not_found"
    assert info.value.param == "model"


def test_unknown_model_message_is_bounded_and_encodable():
    with pytest.raises(ProtocolError) as info:
        check_model("x" * 10_000 + "\ud800", ["m"])
    message = json.loads(json.dumps(info.value.body(), ensure_ascii=False).encode())["error"]["message"]
    assert len(message) < 200


def _events(stream) -> list:
    events = list(stream)
    assert events[-1] == SSE_DONE
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def test_sse_stream_of_a_chat_completion():
    from openai.types.chat import ChatCompletionChunk

    pieces = [("Hel", None), ("", None), ("lo", None), ("", "stop")]
    chunks = _events(sse_stream(pieces, id="c1", model="m", chat=True, include_usage=True, final_usage=usage(4, 2)))
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1


def test_sse_stream_of_a_replayed_cached_completion():
    from deployments.completion_cache import CachedCompletion, replay_pieces

    cached = CachedCompletion("def f():\n    return 1\n", (1, 2, 3), "length", 5, 3)
    seen_usage = []
    chunks = _events(
        sse_stream(
            replay_pieces(cached, max_chars=6),
            id="cmpl-1",
            model="m",
            chat=False,
            include_usage=True,
            final_usage=lambda: seen_usage.append(1) or cached.usage,
        )
    )
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == cached.text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert seen_usage == [1]


def test_sse_stream_without_usage_has_no_usage_field():
    chunks = _events(sse_stream([("a", None), ("", "stop")], id="x", model="m", chat=False))
    assert all("usage" not in c for c in chunks)
    with pytest.raises(ValueError):
        list(sse_stream([], id="x", model="m", chat=True, include_usage=True))


# ---- OpenAPI document -----------------------------------------------------------------------------------


def test_openapi_document_describes_both_bodies_with_resolvable_refs():
    import re

    from deployments.ingress import api
    from deployments.openapi_doc import openapi_document

    bodies = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
    doc = json.loads(json.dumps(openapi_document(api, bodies, served_models=["m"])))
    schemas = doc["components"]["schemas"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert {"CompletionRequest", "ChatCompletionRequest", "ChatMessage", "TextPart", "ErrorResponse"} <= refs
    assert refs <= set(schemas)  # every reference resolves
    assert "$defs" not in json.dumps(doc)
    for path, model in bodies.items():
        post = doc["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(model.__name__)
        assert {"200", "400", "404"} <= set(post["responses"])
    completion = schemas["CompletionRequest"]["properties"]
    assert completion["model"]["enum"] == ["m"]
    # options the engine cannot honour document their only values
    assert completion["suffix"]["enum"] == [None, ""]
    assert completion["seed"]["anyOf"][0]["maximum"] == 2**63 - 1


def _entry(token: str, logprob: float | None, top: tuple = ()) -> LogprobEntry:
    return LogprobEntry(token, tuple(token.encode()), logprob, top)


def test_logprobs_ride_on_chunks_and_offsets_run_across_the_stream():
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    a, b = _entry("He", -0.5, (_entry("He", -0.5), _entry("I", -1.0))), _entry("llo", -0.1, (_entry("y", -0.05),))
    sse = SSEEncoder("c", "m", chat=False)
    chunks = [json.loads(e[len("data: ") :]) for p in ([a], [b]) for e in sse.piece("x", None, tuple(p))]
    laid_out = [c["choices"][0]["logprobs"] for c in chunks]
    assert [lp["text_offset"] for lp in laid_out] == [[0], [2]]
    assert laid_out[1]["top_logprobs"] == [{"y": -0.05, "llo": -0.1}]  # the chosen token is always there
    chat = SSEEncoder("c", "m", chat=True)
    (event,) = chat.piece("", None, (a,))  # held-back text: the tokens' logprobs still go out
    chunk = ChatCompletionChunk.model_validate(json.loads(event[len("data: ") :]))
    assert chunk.choices[0].delta.content == "" and chunk.choices[0].logprobs.content[0].top_logprobs[1].token == "I"
    whole = ChatCompletion.model_validate(
        chat_completion_response("c", "m", "Hello", "stop", usage(1, 2), logprobs=(a, b))
    )
    assert [e.bytes for e in whole.choices[0].logprobs.content] == [[72, 101], [108, 108, 111]]
    echo = completion_response("c", "m", "Hello", "stop", usage(1, 1), logprobs=(_entry("He", None), b))
    laid = echo["choices"][0]["logprobs"]  # the echoed prompt's first token is null, as in OpenAI's answers
    assert laid == {
        "tokens": ["He", "llo"],
        "token_logprobs": [None, -0.1],
        "top_logprobs": [None, {"y": -0.05, "llo": -0.1}],
        "text_offset": [0, 2],
    }
