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
        engine_done = not missing and sum(
            s.value for s in families["ray_specserve_e2e_latency_seconds"].samples if s.name.endswith("_count")
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
