"""OpenAI request validation, sampling-parameter mapping, response / chunk shapes, SSE and error bodies."""

from __future__ import annotations

import json

import pytest

from deployments.openai_protocol import (
    DEFAULT_TEMPERATURE,
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    error_body,
    parse_request,
)
from sampling.params import SamplingParams
from sampling.structured import StructuredOutput

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
    assert req.prompt == expected and req.prompts == [expected]
    assert req.engine_prompt() == {"prompt": expected}


@pytest.mark.parametrize(
    "prompt",
    [["a", "b"], [[1], [2, 3]], ["a", [7, 8], "c"], ["1", "2"]],  # digit strings stay text
)
def test_batches_of_prompts_keep_each_prompt_in_order(prompt):
    assert parse_request(CompletionRequest, {**COMPLETION, "prompt": prompt}).prompts == prompt


@pytest.mark.parametrize(
    "prompt, param",
    [
        (["a", ""], "prompt.1"),
        (["a", "b", [1, -2]], "prompt.2"),
        ([[1], []], "prompt.1"),
        ([[1], [True]], "prompt.1"),
        (["a", 5], "prompt.1"),
        (["a"] * 129, "prompt"),
    ],
)
def test_a_bad_prompt_of_a_batch_is_named_by_its_index(prompt, param):
    err = rejected(CompletionRequest, {**COMPLETION, "prompt": prompt})
    assert err.param == param and err.message.startswith(param + ":")


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
        ("suffix", "end"),
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


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"best_of": 17}, "best_of"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"n": 1, "best_of": 2, "stream": True}, "best_of"),
    ],
)
def test_n_and_best_of_bounds_are_400s(extra, param):
    err = rejected(CompletionRequest, {**COMPLETION, **extra})
    assert (err.status_code, err.param) == (400, param)


def test_n_and_best_of_reach_the_engine_as_its_sequences():
    assert "n" not in parse_request(CompletionRequest, COMPLETION).sampling_kwargs()  # n = 1: as before
    assert parse_request(CompletionRequest, {**COMPLETION, "n": 3}).sampling_kwargs()["n"] == 3
    req = parse_request(CompletionRequest, {**COMPLETION, "n": 2, "best_of": 5})
    assert (req.n, req.sampling_kwargs()["n"]) == (2, 5)
    assert parse_request(ChatCompletionRequest, {**CHAT, "n": 4}).sampling_kwargs()["n"] == 4
    parse_request(CompletionRequest, {**COMPLETION, "n": 2, "best_of": 2, "stream": True})
    assert rejected(ChatCompletionRequest, {**CHAT, "best_of": 2}).param == "best_of"  # completions only


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
        "min_tokens": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": -1,
        "repetition_penalty": 1.3,
        "logit_bias": {"50256": -100, "7": 2.5},
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
        "min_tokens": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": -1,
        "repetition_penalty": 1.3,
        "logit_bias": {50256: -100, 7: 2.5},
    }
    params = SamplingParams(**kw)
    assert params.stop == ["\n\n"] and params.ignore_eos and params.has_logits_controls


@pytest.mark.parametrize(
    "field, value",
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("repetition_penalty", 0),
        ("min_tokens", -1),
        ("logit_bias", {"5": 100.5}),
        ("logit_bias", {"5": -101}),
        ("logit_bias", {"five": 1}),
        ("logit_bias", {"-5": 1}),
        ("logit_bias", {"5": "x"}),
        ("logit_bias", {str(i): 1 for i in range(301)}),
    ],
)
def test_sampling_controls_out_of_range_are_400_naming_the_field(field, value):
    assert rejected(ChatCompletionRequest, {**CHAT, field: value}).param == field


def test_top_k_minus_one_means_no_cut():
    assert parse_request(CompletionRequest, {**COMPLETION, "top_k": -1}).sampling_kwargs()["top_k"] == 0


def test_body_may_be_raw_json_bytes_and_bad_json_is_a_400():
    req = parse_request(CompletionRequest, json.dumps(COMPLETION).encode())
    assert req.prompt == "Once upon"
    assert "JSON" in rejected(CompletionRequest, b'{"model": ').message
    assert "object" in rejected(CompletionRequest, b"[1, 2]").message


def _encodes(err: ProtocolError) -> dict:
    """The error body as the HTTP layer writes it (UTF-8 JSON): it must never fail to encode."""
    return json.loads(json.dumps(err.body(), ensure_ascii=False).encode("utf-8"))


def _json_body(body: dict) -> bytes:
    """A body as a client would send it: JSON with \\u escapes (lone surrogates included), ASCII only."""
    return json.dumps(body).encode("ascii")


@pytest.mark.parametrize(
    "model, body, param",
    [
        (CompletionRequest, {**COMPLETION, "model": "\ud800"}, "model"),
        (CompletionRequest, {**COMPLETION, "prompt": "x" * 100 + "\udfff"}, "prompt"),
        (CompletionRequest, {**COMPLETION, "prompt": "\ud800" + "long prompt " * 1000}, "prompt"),
        (CompletionRequest, {**COMPLETION, "stop": ["ok", "\udc00"]}, "stop.1"),
        (CompletionRequest, {**COMPLETION, "stop": "\ud83d"}, "stop"),
        (CompletionRequest, {**COMPLETION, "user": "\ud800"}, "user"),
        (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
        (
            ChatCompletionRequest,
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udbff"}]}]},
            "messages.0.content.0.text",
        ),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(model, body, param):
    err = rejected(model, _json_body(body))
    assert err.param == param
    assert "surrogate" in err.message
    assert _encodes(err)["error"]["param"] == param


def test_a_surrogate_in_a_key_or_raw_utf8_bytes_is_a_400_that_encodes():
    err = rejected(CompletionRequest, _json_body({**COMPLETION, "\ud800x": 1}))
    assert "\\ud800x" in _encodes(err)["error"]["message"]  # escaped, never echoed raw
    err = rejected(CompletionRequest, b'{"model": "m", "prompt": "\xed\xa0\x80"}')  # a surrogate encoded as UTF-8
    assert "UTF-8" in err.message


def test_valid_astral_characters_pass():
    req = parse_request(
        CompletionRequest, _json_body({**COMPLETION, "prompt": "smile \U0001f600", "stop": "\U0001f600"})
    )
    assert req.prompt == "smile \U0001f600"


def test_error_bodies_escape_what_utf8_cannot_encode():
    body = error_body("bad \ud800", param="x\udc00")
    assert body["error"] == {
        "message": "bad \\ud800",
        "type": "invalid_request_error",
        "param": "x\\udc00",
        "code": None,
    }
    json.dumps(body, ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize(
    "body, words",
    [
        (b"[" * 1500 + b"]" * 1500, "nested"),
        (b'{"model": "m", "prompt": "x", "user": ' + b"[" * 100 + b"]" * 100 + b"}", "nested"),
        (b'{"model": "m", "prompt": "x", "seed": ' + b"7" * 5000 + b"}", "digits"),
        (b'{"model": "m", "prompt": "x", "max_tokens": -' + b"7" * 5000 + b"}", "digits"),
        (b'{"model": "m", "prompt": "x", "temperature": NaN}', "NaN"),
        (b'{"model": "m", "prompt": "x", "temperature": -Infinity}', "Infinity"),
        (b'{"model": "m", "prompt": "x", "temperature": 1e400}', "range"),
        (b'{"model": "m", "prompt": "\xff\xfe"}', "UTF-8"),
        (b'\xef\xbb\xbf{"model": "m", "prompt": "x"}', "BOM"),
        (b'{"model": "m", "prompt": "x"', "JSON"),
        (b"", "JSON"),
    ],
)
def test_bodies_that_fail_to_decode_are_a_400(body, words):
    err = rejected(CompletionRequest, body)
    assert words in err.message
    _encodes(err)


def test_numbers_that_decode_but_no_field_takes_name_the_field():
    huge = 2**64  # the reproduction: "seed": 18446744073709551616
    assert rejected(CompletionRequest, {**COMPLETION, "temperature": 1, "seed": huge}).param == "seed"
    assert rejected(CompletionRequest, {**COMPLETION, "seed": -(2**63) - 1}).param == "seed"
    for seed in (2**63 - 1, -(2**63), 0):
        assert parse_request(CompletionRequest, {**COMPLETION, "seed": seed}).sampling_kwargs()["seed"] == seed
        SamplingParams(
            **parse_request(CompletionRequest, {**COMPLETION, "seed": seed}).sampling_kwargs() | {"max_tokens": 1}
        )
    assert rejected(CompletionRequest, {**COMPLETION, "max_tokens": huge}).param == "max_tokens"
    assert rejected(ChatCompletionRequest, {**CHAT, "max_completion_tokens": huge}).param == "max_completion_tokens"
    assert rejected(CompletionRequest, {**COMPLETION, "top_k": huge}).param == "top_k"
    assert rejected(CompletionRequest, {**COMPLETION, "stop_token_ids": [1, huge]}).param == "stop_token_ids.1"
    assert rejected(CompletionRequest, {**COMPLETION, "stop_token_ids": [-1]}).param == "stop_token_ids.0"
    assert rejected(CompletionRequest, {**COMPLETION, "logprobs": huge}).param == "logprobs"
    assert rejected(CompletionRequest, {**COMPLETION, "n": huge}).param == "n"


def test_tiny_but_finite_numbers_pass_parsing():
    """Subnormal temperatures are valid JSON and in range: the sampler, not the parser, must cope with them."""
    body = b'{"model": "m", "prompt": "x", "temperature": 1e-320, "top_p": 1e-320}'
    req = parse_request(CompletionRequest, body)
    assert 0 < req.temperature < 1e-300 and 0 < req.top_p < 1e-300


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
    [("tools", [{"type": "function"}])],
)
def test_chat_unsupported_options(field, value):
    assert rejected(ChatCompletionRequest, {**CHAT, field: value}).param == field


@pytest.mark.parametrize(
    "schema, body, param",
    [
        (CompletionRequest, {"logprobs": 6}, "logprobs"),
        (CompletionRequest, {"logprobs": -1}, "logprobs"),
        (CompletionRequest, {"logprobs": True}, "logprobs"),
        (CompletionRequest, {"echo": "sometimes"}, "echo"),
        (ChatCompletionRequest, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (ChatCompletionRequest, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        (ChatCompletionRequest, {"top_logprobs": 3}, "top_logprobs"),
        (ChatCompletionRequest, {"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
    ],
)
def test_out_of_range_logprobs_are_400_naming_the_param(schema, body, param):
    base = COMPLETION if schema is CompletionRequest else CHAT
    assert rejected(schema, {**base, **body}).param == param


def test_logprobs_reach_the_sampling_params():
    def kwargs(schema, base, **body):
        params = parse_request(schema, {**base, **body}).sampling_kwargs()
        SamplingParams(**params | {"max_tokens": 1})
        return params.get("logprobs"), params.get("prompt_logprobs")

    assert kwargs(CompletionRequest, COMPLETION) == (None, None)
    assert kwargs(CompletionRequest, COMPLETION, logprobs=0) == (0, None)
    assert kwargs(CompletionRequest, COMPLETION, logprobs=5, echo=True) == (5, 5)
    assert kwargs(CompletionRequest, COMPLETION, echo=True) == (None, None)
    assert kwargs(ChatCompletionRequest, CHAT, logprobs=True) == (0, None)
    assert kwargs(ChatCompletionRequest, CHAT, logprobs=True, top_logprobs=20) == (20, None)
    assert kwargs(ChatCompletionRequest, CHAT, logprobs=False, top_logprobs=0) == (None, None)


def test_chat_accepts_text_response_format_and_no_logprobs():
    req = parse_request(ChatCompletionRequest, {**CHAT, "response_format": {"type": "text"}, "logprobs": False})
    assert "structured" not in req.sampling_kwargs()
    err = rejected(ChatCompletionRequest, {**CHAT, "response_format": {"type": "yaml"}})
    assert err.param == "response_format.type"


SCHEMA = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}


@pytest.mark.parametrize(
    "fields, structured",
    [
        ({"response_format": {"type": "json_object"}}, {"kind": "json_object"}),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
            {"kind": "json_schema", "spec": json.dumps(SCHEMA), "strict": True},
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": False},
                }
            },
            {"kind": "json_schema", "spec": json.dumps(SCHEMA), "strict": False},
        ),
        ({"guided_json": json.dumps(SCHEMA)}, {"kind": "json_schema", "spec": json.dumps(SCHEMA)}),
        ({"guided_regex": "[0-9]+"}, {"kind": "regex", "spec": "[0-9]+"}),
        ({"guided_choice": ["yes", "no"]}, {"kind": "choice", "choices": ["yes", "no"]}),
    ],
)
def test_structured_output_fields_reach_the_sampling_params(fields, structured):
    for model, body in ((ChatCompletionRequest, CHAT), (CompletionRequest, {"model": "m", "prompt": "x"})):
        kwargs = parse_request(model, {**body, **fields}).sampling_kwargs()
        got = SamplingParams(**{**kwargs, "max_tokens": 8}).structured
        assert got == StructuredOutput(**structured)  # the schema's key order is kept (it orders the output)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}}, None),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_json": {}}, "guided_json"),
        ({"guided_json": "[1, 2]"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a", ""]}, "guided_choice.1"),
        ({"guided_regex": ""}, "guided_regex"),
    ],
)
def test_malformed_structured_output_fields_are_400s_naming_the_field(fields, param):
    err = rejected(ChatCompletionRequest, {**CHAT, **fields})
    assert err.param == (param or "response_format.json_schema.name"), err.message
