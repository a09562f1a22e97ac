"""OpenAI request validation, sampling-parameter mapping, response / chunk shapes, SSE and error bodies."""

from __future__ import annotations

import json

import pytest

from deployments.openai_protocol import (
    DEFAULT_TEMPERATURE,
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    chat_completion_chunk,
    chat_completion_response,
    check_model,
    completion_chunk,
    completion_response,
    error_body,
    model_list,
    parse_request,
    sse_event,
    sse_stream,
    usage,
    usage_chunk,
)
from engine.sampling_params import SamplingParams

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "Once upon"}


def rejected(model, body) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_request(model, body)
    assert info.value.status_code == 400
    return info.value


# ---- completions requests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [("abc", "abc"), ([1, 2, 3], [1, 2, 3]), (["abc"], "abc"), ([[5, 6]], [5, 6])],
)
def test_prompt_forms_normalize_to_one_prompt(prompt, expected):
    req = parse_request(CompletionRequest, {**COMPLETION, "prompt": prompt})
    assert req.prompt == expected
    assert req.engine_prompt() == {"prompt": expected}


@pytest.mark.parametrize("prompt", [["a", "b"], [[1], [2]]])
def test_batched_prompts_are_refused_clearly(prompt):
    err = rejected(CompletionRequest, {**COMPLETION, "prompt": prompt})
    assert err.param == "prompt"
    assert "not supported" in err.message


@pytest.mark.parametrize("prompt", ["", [], 5, [1, "a"], [-1], [True], {"text": "x"}])
def test_bad_prompts_name_the_field(prompt):
    assert rejected(CompletionRequest, {**COMPLETION, "prompt": prompt}).param == "prompt"


def test_unknown_field_is_a_400_naming_it():
    err = rejected(CompletionRequest, {**COMPLETION, "temprature": 0})
    assert err.param == "temprature"
    assert "unknown field" in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", "hot"),
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("max_tokens", 0),
        ("max_tokens", "ten"),
        ("seed", "x"),
        ("stream", "sometimes"),
        ("stop", 3),
        ("stop", ["ok", 3]),
        ("stop", ""),
        ("top_k", -2),
    ],
)
def test_wrong_types_and_ranges_are_400_naming_the_field(field, value):
    assert rejected(CompletionRequest, {**COMPLETION, field: value}).param == field


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 2),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("logprobs", 1),
        ("logprobs", 0),
        ("echo", True),
        ("suffix", "end"),
        ("best_of", 3),
        ("logit_bias", {"50256": -100}),
    ],
)
def test_unsupported_options_are_refused_not_ignored(field, value):
    err = rejected(CompletionRequest, {**COMPLETION, field: value})
    assert err.param == field
    assert "support" in err.message


@pytest.mark.parametrize(
    "field, value",
    [("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0.0), ("logprobs", None), ("echo", False)],
)
def test_neutral_values_of_unsupported_options_pass(field, value):
    parse_request(CompletionRequest, {**COMPLETION, field: value})


def test_missing_model_is_a_400():
    assert rejected(CompletionRequest, {"prompt": "x"}).param == "model"


def test_stream_options_require_stream():
    err = rejected(CompletionRequest, {**COMPLETION, "stream_options": {"include_usage": True}})
    assert err.param == "stream_options"
    req = parse_request(CompletionRequest, {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}})
    assert req.include_usage
    assert not parse_request(CompletionRequest, {**COMPLETION, "stream": True}).include_usage


def test_sampling_kwargs_defaults_follow_openai_and_build_sampling_params():
    kw = parse_request(CompletionRequest, COMPLETION).sampling_kwargs()
    assert kw["max_tokens"] is None  # decided by the caller from the context left
    assert kw["temperature"] == DEFAULT_TEMPERATURE == 1.0
    assert kw["top_p"] == 1.0 and kw["top_k"] == 0 and kw["stop"] == [] and kw["seed"] is None
    SamplingParams(**{**kw, "max_tokens": 16})  # every key is one SamplingParams knows


def test_sampling_kwargs_carry_every_given_value():
    body = {
        **COMPLETION,
        "max_tokens": 7,
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 11,
        "stop": "\n\n",
        "ignore_eos": True,
        "skip_special_tokens": False,
        "stop_token_ids": [2],
    }
    kw = parse_request(CompletionRequest, body).sampling_kwargs()
    assert kw == {
        "max_tokens": 7,
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 11,
        "stop": ["\n\n"],
        "stop_token_ids": [2],
        "ignore_eos": True,
        "skip_special_tokens": False,
    }
    params = SamplingParams(**kw)
    assert params.stop == ["\n\n"] and params.ignore_eos


def test_top_k_minus_one_means_no_cut():
    assert parse_request(CompletionRequest, {**COMPLETION, "top_k": -1}).sampling_kwargs()["top_k"] == 0


def test_body_may_be_raw_json_bytes_and_bad_json_is_a_400():
    req = parse_request(CompletionRequest, json.dumps(COMPLETION).encode())
    assert req.prompt == "Once upon"
    assert "JSON" in rejected(CompletionRequest, b'{"model": ').message
    assert "object" in rejected(CompletionRequest, b"[1, 2]").message


# ---- chat requests -------------------------------------------------------------------------------------


def test_chat_messages_flatten_text_parts_and_map_developer_to_system():
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
    }
    req = parse_request(ChatCompletionRequest, body)
    assert req.engine_prompt() == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    }


def test_empty_messages_is_a_400():
    assert rejected(ChatCompletionRequest, {"model": "m", "messages": []}).param == "messages"


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "robot", "content": "x"}, "messages.0.role"),
        ({"role": "user", "content": 5}, "messages.0.content"),
        ({"role": "user"}, "messages.0.content"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages.0.content"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages.0.content.0.text"),
        ({"role": "user", "content": "x", "mood": "happy"}, "messages.0.mood"),
    ],
)
def test_bad_messages_name_the_exact_path(message, param):
    err = rejected(ChatCompletionRequest, {"model": "m", "messages": [message]})
    assert err.param == param
    assert err.message.startswith(param + ":")


def test_max_completion_tokens_wins_and_conflicts_are_refused():
    req = parse_request(ChatCompletionRequest, {**CHAT, "max_completion_tokens": 9})
    assert req.sampling_kwargs()["max_tokens"] == 9
    assert parse_request(ChatCompletionRequest, {**CHAT, "max_tokens": 5}).sampling_kwargs()["max_tokens"] == 5
    err = rejected(ChatCompletionRequest, {**CHAT, "max_tokens": 5, "max_completion_tokens": 9})
    assert err.param == "max_completion_tokens"


@pytest.mark.parametrize(
    "field, value",
    [("logprobs", True), ("top_logprobs", 3), ("tools", [{"type": "function"}]), ("n", 3)],
)
def test_chat_unsupported_options(field, value):
    assert rejected(ChatCompletionRequest, {**CHAT, field: value}).param == field


def test_chat_accepts_text_response_format_and_no_logprobs():
    parse_request(ChatCompletionRequest, {**CHAT, "response_format": {"type": "text"}, "logprobs": False})
    err = rejected(ChatCompletionRequest, {**CHAT, "response_format": {"type": "json_object"}})
    assert err.param == "response_format.type"


# ---- responses -------------------------------------------------------------------------------------------


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
