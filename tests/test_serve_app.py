"""The Serve app end to end: real Ray, real HTTP, the real default model, the `openai` client."""

from __future__ import annotations

import json
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from cluster.local_cluster import served_app  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
APP_ARGS = {
    "engine": {"speculator": "ngram", "kv_cache_gib": 0.25, "max_model_len": 2048},
    "target": {"num_replicas": 1, "shard_resources": {"num_cpus": 1}},
    "ingress": {"completion_cache": {"admit_after": 2}, "prefix_affinity": {"stats_period_s": 0.5}},
}


@pytest.fixture(scope="module")
def base_url(local_ray):
    with served_app(APP_ARGS) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def stats(base_url: str) -> dict:
    return httpx.get(f"{base_url}/v1/stats", timeout=30).json()


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_matches_the_in_process_engine(client, make_engine):
    prompt = "def fibonacci(n):\n    "
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert raw.headers["x-specserve-replica"] not in ("", "completion-cache")  # a replica answered
    out = raw.parse()
    engine = make_engine(kv_cache_gib=0.25)
    ref = engine.generate([prompt], engine_params(24))[0]
    assert out.choices[0].text == ref.text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.output_token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def engine_params(max_tokens: int):
    from sampling.params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0)


def test_chat_stream_ends_with_done_and_usage(base_url, client):
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the raw stream ends with the [DONE] sentinel
    with httpx.stream(
        "POST",
        f"{base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 5, "temperature": 0, "stream": True},
        timeout=120,
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"


def test_stop_string_ends_the_completion(client):
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    text = free.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    out = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.index(stop)]


def test_completion_cache_serves_repeats_without_a_replica(base_url, client):
    prompt = "The capital of France is"
    before = stats(base_url)
    texts = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text]
    for _ in range(3):
        texts.append(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text)
    after = stats(base_url)
    assert len(set(texts)) == 1
    # seen twice before admission: the first two go to the replica, the next two are cache hits
    assert after["replica"]["num_requests"] - before["replica"]["num_requests"] == 2
    assert after["completion_cache"]["hits"] - before["completion_cache"]["hits"] == 2
    # a replayed stream carries the same text
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == texts[0]
    assert stats(base_url)["replica"]["num_requests"] == after["replica"]["num_requests"]
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert raw.headers["x-specserve-replica"] == "completion-cache"


def test_sampled_requests_are_never_cached(base_url, client):
    before = stats(base_url)
    for _ in range(3):
        client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0.9)
    after = stats(base_url)
    assert after["replica"]["num_requests"] - before["replica"]["num_requests"] == 3
    assert after["completion_cache"]["hits"] == before["completion_cache"]["hits"]


@pytest.mark.parametrize(
    "body, status, param",
    [
        ("{not json", 400, None),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "bogus_field": 1}, 400, "bogus_field"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 100000}, 400, None),
        ({"model": MODEL, "prompt": "hi", "top_p": 2}, 400, "top_p"),
        ({"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_shaped_4xx(base_url, body, status, param):
    route = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{base_url}{route}", content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param


def test_client_disconnect_frees_kv_blocks_at_once(base_url):
    """Read from the block manager actor itself: the sequence is gone and every block is back."""
    idle = stats(base_url)["replica"]["block_manager"]
    assert idle["num_seqs"] == 0 and idle["num_free_blocks"] == idle["num_blocks"] - 1
    body = {
        "model": MODEL,
        "prompt": "Write a long story about a dragon.",
        "max_tokens": 1000,
        "stream": True,
        "temperature": 0.8,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as r:
        lines, it = [], r.iter_lines()  # keep the iterator: dropping it closes the connection
        while len(lines) < 3:
            line = next(it)
            lines += [line] if line.startswith("data: ") else []
        replica = stats(base_url)["replica"]
        busy = replica["block_manager"]
        assert busy["num_seqs"] == 1 and busy["num_free_blocks"] < idle["num_free_blocks"], (lines, replica)
    deadline = time.time() + 20
    while time.time() < deadline:
        now = stats(base_url)["replica"]["block_manager"]
        if now["num_seqs"] == 0 and now["num_free_blocks"] == idle["num_free_blocks"]:
            break
        time.sleep(0.2)
    assert now["num_seqs"] == 0 and now["num_free_blocks"] == idle["num_free_blocks"]


# Every family the app records, as Ray's metrics export names them (`ray_` prefix; counters without `_total`).
METRIC_FAMILIES = {
    "ray_specserve_requests": "counter",
    "ray_specserve_completion_cache_lookups": "counter",
    "ray_specserve_completion_tokens": "counter",
    "ray_specserve_requests_in_flight": "gauge",
    "ray_specserve_running_sequences": "gauge",
    "ray_specserve_waiting_sequences": "gauge",
    "ray_specserve_kv_blocks_used": "gauge",
    "ray_specserve_kv_blocks_free": "gauge",
    "ray_specserve_prefix_cache_hit_rate": "gauge",
    "ray_specserve_prefix_cache_queried_tokens": "counter",
    "ray_specserve_prefix_cache_hit_tokens": "counter",
    "ray_specserve_preemptions": "counter",
    "ray_specserve_prompt_tokens": "counter",
    "ray_specserve_generation_tokens": "counter",
    "ray_specserve_time_to_first_token_seconds": "histogram",
    "ray_specserve_inter_token_latency_seconds": "histogram",
    "ray_specserve_queue_time_seconds": "histogram",
    "ray_specserve_e2e_latency_seconds": "histogram",
    "ray_specserve_spec_draft_tokens": "counter",
    "ray_specserve_spec_accepted_tokens": "counter",
    "ray_specserve_speculator_version": "gauge",
    "ray_specserve_spec_acceptance_by_position": "gauge",
    "ray_specserve_spec_tokens_per_step": "gauge",
}


def scrape(base_url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{base_url}/metrics", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_metrics_hold_every_family_after_traffic(base_url, client):
    """Ray exports what replicas record every few seconds: poll until every family is there."""
    prompt = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    "
    for _ in range(2):  # the second prefill finds the first one's blocks in the prefix cache
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.5, seed=1)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    deadline = time.time() + 90
    while True:  # the ingress and the replica export on their own clocks: wait for both
        families = scrape(base_url)
        missing = {n for n in METRIC_FAMILIES if n not in families or not families[n].samples}
        # earlier tests' traffic may already fill every family: wait for this test's own effects too
        engine_done = not missing and sum(
            s.value
            for s in families["ray_specserve_prefix_cache_hit_tokens"].samples
            if not s.name.endswith("_created")
        )
        routes = set() if missing else {s.labels.get("route") for s in families["ray_specserve_requests"].samples}
        if (engine_done and {"completions", "chat"} <= routes) or time.time() > deadline:
            break
        time.sleep(1)
    assert not missing, sorted(missing)
    assert {n: families[n].type for n in METRIC_FAMILIES} == METRIC_FAMILIES
    # engine metrics are labelled by the replica that recorded them
    replica_series = families["ray_specserve_kv_blocks_free"].samples
    assert replica_series and all(s.labels.get("replica") for s in replica_series), [s.labels for s in replica_series]
    assert all(s.labels["deployment"] == "LLMServer" for s in replica_series)
    totals = {n: sum(s.value for s in families[n].samples if not s.name.endswith("_created")) for n in METRIC_FAMILIES}
    assert totals["ray_specserve_prompt_tokens"] > 0 and totals["ray_specserve_generation_tokens"] > 0
    assert 0 < totals["ray_specserve_prefix_cache_hit_tokens"] <= totals["ray_specserve_prefix_cache_queried_tokens"]
    spec = families["ray_specserve_spec_draft_tokens"].samples
    assert {s.labels["speculator"] for s in spec} == {"ngram"}
    routes = {s.labels.get("route") for s in families["ray_specserve_requests"].samples}
    assert {"completions", "chat"} <= routes


def test_sampling_controls_reach_the_engine(client, make_engine, tokenizer):
    """OpenAI's names and vLLM's extras (extra_body) give what the in-process engine gives with them."""
    from sampling.params import SamplingParams

    prompt = "1, 2, 3, 4,"
    comma = tokenizer(",")["input_ids"][0]
    extra = {"repetition_penalty": 1.2, "min_tokens": 10, "ignore_eos": False, "stop_token_ids": [2]}
    out = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        logit_bias={str(comma): -100},
        extra_body=extra,
    )
    engine = make_engine(kv_cache_gib=0.25)
    controls = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "logit_bias": {comma: -100.0}, **extra}
    ref = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, **controls))[0]
    assert out.choices[0].text == ref.text and comma not in ref.output_token_ids
    assert ref.text != engine.generate([prompt], engine_params(12))[0].text, "the controls changed nothing"
    forced = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0.7, logit_bias={"42": 100}
    )
    assert forced.choices[0].text == tokenizer.decode([42] * 5)


def test_prompt_lists_and_token_ids_answer_like_single_requests(base_url, client, tokenizer):
    prompts = ["The capital of Italy is", "def square(x):\n"]
    ids = tokenizer(prompts[0])["input_ids"]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0) for p in prompts]
    expected = [s.choices[0].text for s in singles] + [singles[0].choices[0].text]
    batch = client.completions.create(model=MODEL, prompt=[*prompts, ids], max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == expected
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles) + len(ids)
    assert batch.usage.completion_tokens == 3 * 8
    assert (
        client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0).choices[0].text == expected[0]
    )
    stream = client.completions.create(
        model=MODEL,
        prompt=[*prompts, ids],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, usage = ["", "", ""], [None] * 3, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.text
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == expected and finishes == ["length"] * 3
    assert usage.total_tokens == batch.usage.total_tokens
    body = {"model": MODEL, "prompt": ["fine", [10**7]], "max_tokens": 4}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt.1", r.text


def engine_logprobs(make_engine, params: dict, **prompt):
    """The in-process engine without speculation: the output's tokens and logprobs, the prompt's logprobs."""
    from sampling.params import SamplingParams

    engine = make_engine(kv_cache_gib=0.25)
    engine.add_request(**prompt, params=SamplingParams(temperature=0, **params))
    outs = list(engine.run())
    return [lp for o in outs for lp in o.logprobs], outs[0].prompt_logprobs


def test_chat_logprobs_equal_plain_decoding_whole_and_streamed(client, make_engine):
    """Served with n-gram speculation, compared with the engine without it."""
    messages = [{"role": "user", "content": "Count from one to ten."}]
    args = {"model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0, "logprobs": True}
    whole = client.chat.completions.create(**args, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    chunks = [c for c in client.chat.completions.create(**args, top_logprobs=3, stream=True) if c.choices]
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in streamed] == [
        (e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in content
    ]
    # the stream's prefill found the prompt in the prefix cache: the same values up to the float rounding
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    assert len(content) == whole.usage.completion_tokens
    ref, _ = engine_logprobs(make_engine, {"max_tokens": 10, "logprobs": 3}, messages=messages)
    for entry, lp in zip(content, ref, strict=True):
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert abs(entry.logprob - lp.logprob) <= 1e-4
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert [abs(t.logprob - v) <= 1e-4 for t, (_, v) in zip(entry.top_logprobs, lp.top)] == [True] * 3
    if whole.choices[0].finish_reason == "length":  # no end-of-turn token, whose text is not shown
        assert "".join(e.token for e in content) == whole.choices[0].message.content
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_with_echo_whole_and_streamed(client, make_engine, tokenizer):
    prompt = "1, 2, 3, 4, 5,"
    n_prompt = len(tokenizer(prompt)["input_ids"])
    args = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 2}
    whole = client.completions.create(**args, echo=True).choices[0]
    lp = whole.logprobs
    assert whole.text.startswith(prompt) and len(lp.tokens) == n_prompt + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[1:])  # the top 2 and the chosen token
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert "".join(lp.tokens) == whole.text
    ref, ref_prompt = engine_logprobs(
        make_engine, {"max_tokens": 6, "logprobs": 2, "prompt_logprobs": 2}, prompt=prompt
    )
    values = [x.logprob for x in ref_prompt + ref]
    assert all(abs(a - b) <= 1e-4 for a, b in zip(lp.token_logprobs[1:], values, strict=True))
    chunks = [c.choices[0] for c in client.completions.create(**args, echo=True, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    gathered = {k: [v for c in chunks if c.logprobs for v in getattr(c.logprobs, k)] for k in ("tokens", "text_offset")}
    assert gathered == {"tokens": lp.tokens, "text_offset": lp.text_offset}
    plain = client.completions.create(**args)
    assert plain.choices[0].text == whole.text[len(prompt) :]
    assert plain.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[n_prompt:], abs=1e-4)


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_out_of_range_logprobs_are_400(base_url, route, body, param):
    r = httpx.post(f"{base_url}/v1/{route}", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_prompt_lists_carry_logprobs_and_echo_per_choice(client, tokenizer):
    prompts = ["The capital of Italy is", tokenizer("def square(x):\n")["input_ids"]]
    args = {"model": MODEL, "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True}
    singles = [client.completions.create(prompt=p, **args).choices[0] for p in prompts]
    batch = client.completions.create(prompt=prompts, **args)
    assert [c.text for c in batch.choices] == [s.text for s in singles]
    assert [c.logprobs.tokens for c in batch.choices] == [s.logprobs.tokens for s in singles]
    assert batch.choices[1].text.startswith("def square(x):\n")
    tokens: list[list[str]] = [[], []]
    for chunk in client.completions.create(prompt=prompts, stream=True, **args):
        for c in chunk.choices:
            tokens[c.index] += c.logprobs.tokens if c.logprobs else []
    assert tokens == [s.logprobs.tokens for s in singles]


def sse_events(base_url: str, route: str, body: dict) -> list:
    """The raw events of a stream, `[DONE]` included."""
    with httpx.stream("POST", f"{base_url}{route}", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [
            line.removeprefix("data: ") if line == "data: [DONE]" else json.loads(line.removeprefix("data: "))
            for line in r.iter_lines()
            if line.startswith("data: ")
        ]


def choice_text(events: list, index: int) -> str:
    """Choice `index`'s text over a stream's chunks (completions or chat)."""
    choices = [c["choices"][0] for c in events if isinstance(c, dict) and c["choices"]]
    return "".join(c.get("text") or c.get("delta", {}).get("content") or "" for c in choices if c["index"] == index)


def test_n_choices_share_one_prompt_and_are_never_cached(base_url, client):
    prompt = "The three primary colours are"
    single = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    before = stats(base_url)
    for _ in range(3):
        raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, n=3)
        assert raw.headers["x-specserve-replica"] != "completion-cache"
        out = raw.parse()
        assert [c.index for c in out.choices] == [0, 1, 2]
        assert [c.text for c in out.choices] == [single.choices[0].text] * 3
        assert out.usage.prompt_tokens == single.usage.prompt_tokens  # counted once
        assert out.usage.completion_tokens == 3 * single.usage.completion_tokens
    after = stats(base_url)
    assert after["completion_cache"]["hits"] == before["completion_cache"]["hits"]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=5, temperature=1.0, seed=5, n=3
    )
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.finish_reason for c in chat.choices)
    assert 3 <= chat.usage.completion_tokens <= 15
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


@pytest.mark.parametrize("chat", [False, True])
def test_n_streams_each_choice_to_its_finish_then_usage_once(base_url, chat):
    body = {"model": MODEL, "max_tokens": 5, "temperature": 1.0, "seed": 9, "n": 3, "stream": True}
    body |= {"stream_options": {"include_usage": True}}
    if chat:
        route, body = "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "Count to ten."}]}
    else:
        route, body = "/v1/completions", {**body, "prompt": "Count to ten: one, two,"}
    events = sse_events(base_url, route, body)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]["usage"]
    assert all(len(c["choices"]) == 1 and c["usage"] is None for c in chunks)
    finishes = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finishes) == [0, 1, 2]
    tokens = usage["completion_tokens"]
    assert 3 <= tokens <= 15 and usage["total_tokens"] == usage["prompt_tokens"] + tokens
    again = sse_events(base_url, route, body)
    assert [choice_text(again, i) for i in range(3)] == [choice_text(events, i) for i in range(3)]  # seeded


def test_best_of_returns_the_most_likely_of_its_sequences(base_url, client):
    prompt = "My favourite animal is the"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0, seed=3, best_of=3, n=1)
    assert [c.index for c in out.choices] == [0] and out.choices[0].finish_reason == "length"
    three = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0, seed=3, n=3)
    assert out.choices[0].text in [c.text for c in three.choices]  # the same three sequences were sampled
    body = {"model": MODEL, "prompt": prompt, "best_of": 3, "n": 1, "stream": True}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", r.text


def test_prompt_list_times_n_indexes_prompt_then_sample(client):
    prompts = ["The capital of France is", "def cube(x):\n"]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0) for p in prompts]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [s.choices[0].text for s in singles for _ in range(2)]


def test_n_choices_carry_their_own_logprobs_and_echo(client):
    """n sequences of one prompt forked after its prefill: each choice has the prompt's echo and logprobs."""
    prompt = "The capital of Spain is"
    args = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True}
    single = client.completions.create(**args).choices[0]
    out = client.completions.create(**args, n=2)
    assert [c.text for c in out.choices] == [single.text] * 2
    for c in out.choices:
        assert c.logprobs.tokens == single.logprobs.tokens
        assert c.logprobs.token_logprobs[0] is None
        assert c.logprobs.token_logprobs[1:] == pytest.approx(single.logprobs.token_logprobs[1:], abs=1e-4)


def test_json_schema_response_format_and_a_schema_that_does_not_compile(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    messages = [{"role": "user", "content": "Bob is 42. Give his name and age as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=32, temperature=0, response_format=fmt
    )
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    choice = client.completions.create(
        model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=4, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert choice.choices[0].text in ("yes", "no")
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "frobnicate"}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, response_format=bad)
    assert err.value.param == "response_format" and "frobnicate" in err.value.message


def test_a_grammar_that_allows_no_next_token_mid_output_is_refused_naming_it(base_url):
    """A regex whose first tokens match but then nothing can (`ab` then an empty class): not an engine failure
    (a 500) but the request's own spec: a 400 naming `guided_regex`, or in a stream its tokens so far and then an
    error event saying so."""
    body = {"model": MODEL, "prompt": "Say:", "max_tokens": 8, "temperature": 0, "guided_regex": r"ab[^\s\S]"}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "guided_regex", r.text
    assert "no output can continue to match it" in error["message"]
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [line[len("data: ") :] for line in s.iter_lines() if line.startswith("data: ")]
    assert s.status_code == 200 and events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
    assert text == "ab" and json.loads(events[-2])["error"]["param"] == "guided_regex", events
