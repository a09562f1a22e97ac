"""The Serve app under hostile clients and faults: API keys, body limits, per-caller cache, disconnects at any
point, overload, a cache actor restart, a replica killed mid-stream. Real Ray, real HTTP, the default model."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from cluster.local_cluster import free_port  # noqa: E402
from deployments.app import build_app  # noqa: E402

RAY_CPUS = 2
MODEL = "SmolLM2-135M-Instruct"
KEY_A = "sk-test-inference-aaaaaaaaaaaa"
KEY_B = "sk-test-inference-bbbbbbbbbbbb"
ADMIN = "sk-test-admin-cccccccccccccccc"
MAX_IN_FLIGHT = 8
DISCONNECTS = int(os.environ.get("SPECSERVE_TEST_DISCONNECTS", "36"))  # more for a longer run
BODY_LIMIT = 65536


def app_args(keys_file: str) -> dict:
    return {
        "engine": {"speculator": "ngram", "kv_cache_gib": 0.25, "max_model_len": 512, "max_num_seqs": 8},
        "target": {
            "num_replicas": 1,
            "shard_resources": {"num_cpus": 1},
            "max_ongoing_requests": 4,
            "max_queued_requests": 2,
            "admission": {"max_waiting": 2},
        },
        "ingress": {
            "max_ongoing_requests": 64,
            "max_request_bytes": BODY_LIMIT,
            "resume_timeout_s": 180,
            "admission": {"max_in_flight": MAX_IN_FLIGHT, "retry_after_s": 2},
            "auth": {"enabled": True, "keys_env": None, "keys_file": keys_file},
            "completion_cache": {"admit_after": 1},
            "prefix_affinity": {"stats_period_s": 0.5},
        },
    }


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def served(local_ray, tmp_path_factory):
    """The app, plus what /health and /v1/models answered while the replica was still loading."""
    keys_file = tmp_path_factory.mktemp("secrets") / "api-keys"
    keys_file.write_text(f"# test keys\n{KEY_A}\ninference:{KEY_B}\nadmin:{ADMIN}\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(app_args(str(keys_file)))
    # serve.run returns once every replica is up: run it aside and poll meanwhile
    deploy = threading.Thread(target=serve.run, args=(app,), kwargs={"name": "specserve", "route_prefix": "/"})
    deploy.start()
    url = f"http://127.0.0.1:{port}"
    early, deadline = [], time.time() + 300
    while time.time() < deadline:
        try:
            m = httpx.get(f"{url}/v1/models", headers=auth(KEY_A), timeout=10)
            r = httpx.get(f"{url}/health", timeout=10)  # after: if /health is not ready, /v1/models was not
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        early.append((r.status_code, r.headers.get("retry-after"), r.text, m.status_code))
        if r.status_code == 200:
            break
        time.sleep(0.5)
    deploy.join()
    yield url, early
    serve.shutdown()


@pytest.fixture(scope="module")
def base_url(served):
    return served[0]


def stats(base_url: str) -> dict:
    r = httpx.get(f"{base_url}/v1/stats", headers=auth(ADMIN), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "\n" not in error["message"]
    if code is not None:
        assert error["code"] == code
    assert r.headers.get("x-request-id")
    return error


def completion(prompt: str = "Say hi.", **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}


# ---- readiness and API keys ------------------------------------------------------------------------------


def test_out_of_service_until_a_replica_can_serve(served):
    _, early = served
    assert early[-1][0] == 200
    not_ready = [e for e in early if e[0] == 503 and '"not_ready"' in e[2]]
    assert not_ready, early  # the ingress was up before the replica and said so
    for _, retry_after, _, _ in not_ready:
        assert retry_after is not None and int(retry_after) >= 1
    # /v1/models (asked just before /health) is 503 while not ready; 404 only while Serve's proxy has no route
    # to the app yet; never 200.
    assert all(models_status in (503, 404) for *_, models_status in not_ready), early
    assert 503 in [models_status for *_, models_status in early], early


def test_api_keys_and_scopes(base_url):
    assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200  # probes need no key
    none = httpx.get(f"{base_url}/v1/models", timeout=30)
    assert_openai_error(none, 401, "invalid_api_key")
    assert none.headers["www-authenticate"] == "Bearer"
    assert_openai_error(httpx.get(f"{base_url}/v1/models", headers=auth("sk-wrong-key-000000000"), timeout=30), 401)
    assert_openai_error(httpx.get(f"{base_url}/v1/models", headers={"authorization": KEY_A}, timeout=30), 401)
    ok = httpx.get(f"{base_url}/v1/models", headers=auth(KEY_A), timeout=30)
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL
    for path in ("/v1/stats", "/metrics", "/openapi.json"):
        assert_openai_error(httpx.get(f"{base_url}{path}", timeout=30), 401)
        assert_openai_error(httpx.get(f"{base_url}{path}", headers=auth(KEY_B), timeout=30), 403, "insufficient_scope")
        assert httpx.get(f"{base_url}{path}", headers=auth(ADMIN), timeout=30).status_code == 200, path
    denied = httpx.post(f"{base_url}/v1/completions", json=completion(), headers=auth(ADMIN), timeout=60)
    assert_openai_error(denied, 403)
    assert KEY_A not in denied.text
    r = httpx.post(f"{base_url}/v1/completions", json=completion(), headers=auth(KEY_B), timeout=60)
    assert r.status_code == 200, r.text


# ---- bodies ----------------------------------------------------------------------------------------------


def test_big_bodies_get_413_and_unfittable_prompts_400(base_url):
    big = json.dumps(completion("x" * (10 << 20))).encode()
    t0 = time.perf_counter()
    r = httpx.post(f"{base_url}/v1/completions", content=big, headers=auth(KEY_A), timeout=60)
    assert_openai_error(r, 413, "request_too_large")

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(40):
            yield b"y" * 4096
        yield b'"}'

    r = httpx.post(f"{base_url}/v1/completions", content=chunks(), headers=auth(KEY_A), timeout=60)
    assert_openai_error(r, 413)
    # under the body limit, but more bytes than 511 tokens can cover: refused before tokenizing
    r = httpx.post(f"{base_url}/v1/completions", json=completion("z" * 60000), headers=auth(KEY_A), timeout=60)
    error = assert_openai_error(r, 400)
    assert "context" in error["message"]
    assert time.perf_counter() - t0 < 30


# ---- the completion cache is per caller -------------------------------------------------------------------


def test_cache_is_scoped_per_api_key_and_user(base_url):
    body = completion("List three fruits:", user="alice")

    def ask(key: str, **changes) -> httpx.Response:
        r = httpx.post(f"{base_url}/v1/completions", json={**body, **changes}, headers=auth(key), timeout=120)
        assert r.status_code == 200, r.text
        return r

    first = ask(KEY_A)
    assert first.headers["x-specserve-replica"] != "completion-cache"
    hit = ask(KEY_A)
    assert hit.headers["x-specserve-replica"] == "completion-cache"  # admit_after 1: the repeat is replayed
    assert hit.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert ask(KEY_B).headers["x-specserve-replica"] != "completion-cache"  # another key: not replayed
    assert ask(KEY_A, user="bob").headers["x-specserve-replica"] != "completion-cache"  # another user


# ---- disconnects ------------------------------------------------------------------------------------------


def wait_idle(base_url: str, idle_free: int, within_s: float = 20.0) -> dict:
    deadline = time.time() + within_s
    while True:
        replica = stats(base_url)["replica"]
        blocks = replica["block_manager"]
        settled = (replica["num_running"], replica["num_waiting"], blocks["num_seqs"]) == (0, 0, 0)
        if (settled and blocks["num_free_blocks"] == idle_free) or time.time() > deadline:
            return replica
        time.sleep(0.25)


async def _disconnecting_client(base_url: str, n: int, seed: int) -> list[str]:
    """n requests, each dropped at a random moment (before its first byte, mid-stream, mid non-stream)."""
    rng = random.Random(seed)
    outcomes: list[str] = []

    async def one(i: int, client: httpx.AsyncClient) -> None:
        stream = i % 3 != 0
        body = {
            "model": MODEL,
            "prompt": f"Tell story {i} about a dragon.",
            "max_tokens": 400,
            "temperature": 0.8,
            "ignore_eos": True,
            "stream": stream,
        }

        async def go() -> None:
            async with client.stream("POST", "/v1/completions", json=body, headers=auth(KEY_A)) as r:
                async for _ in r.aiter_lines():
                    pass

        try:
            await asyncio.wait_for(go(), timeout=rng.uniform(0.0, 2.5))
            outcomes.append("answered")
        except (TimeoutError, asyncio.TimeoutError):
            outcomes.append("dropped")

    for wave in range(0, n, 6):  # under the in-flight limit, so that every request is admitted
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            await asyncio.gather(*(one(i, client) for i in range(wave, min(n, wave + 6))))
    return outcomes


def test_disconnects_at_any_point_free_every_sequence_and_block(base_url):
    idle = wait_idle(base_url, -1, within_s=0)["block_manager"]
    idle_free = idle["num_blocks"] - 1
    outcomes = asyncio.run(_disconnecting_client(base_url, DISCONNECTS, seed=16))
    assert outcomes.count("dropped") >= DISCONNECTS // 2  # the rest were answered before their client left
    replica = wait_idle(base_url, idle_free)
    blocks = replica["block_manager"]
    assert (replica["num_running"], replica["num_waiting"], blocks["num_seqs"]) == (0, 0, 0), replica
    assert blocks["num_free_blocks"] == idle_free, replica
    assert stats(base_url)["ingress"]["in_flight"] == 0
    held = idle_free - blocks["num_free_blocks"]
    print(f"\ndisconnects: {outcomes.count('dropped')}/{len(outcomes)} dropped, {held} KV blocks held after")


# ---- overload ---------------------------------------------------------------------------------------------


async def _burst(base_url: str, n: int) -> list[tuple]:
    async def one(i: int, client: httpx.AsyncClient):
        body = {**completion(f"Count to ten, attempt {i}:"), "max_tokens": 16, "ignore_eos": True, "stream": True}
        t0 = time.perf_counter()
        async with client.stream("POST", "/v1/completions", json=body, headers=auth(KEY_A)) as r:
            lines = [line async for line in r.aiter_lines() if line]
        done = bool(lines) and lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join(lines)
        elapsed, retry = time.perf_counter() - t0, r.headers.get("retry-after")
        return r.status_code, elapsed, retry, done, "".join(lines), r.headers.get("x-request-id")

    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        return await asyncio.gather(*(one(i, client) for i in range(n)))


def test_overload_is_shed_with_retry_after_and_admitted_requests_finish(base_url):
    results = asyncio.run(_burst(base_url, 4 * MAX_IN_FLIGHT))
    admitted = [r for r in results if r[0] == 200]
    shed = [r for r in results if r[0] in (429, 503)]
    assert len(admitted) + len(shed) == len(results), results
    assert shed and admitted, results
    assert all(r[2] is not None and int(r[2]) >= 1 for r in shed)
    for status, _, _, _, body, request_id in shed:  # one line, OpenAI-shaped; a 503 names its request
        error = json.loads(body)["error"]
        assert error["code"] in ("rate_limit_exceeded", "overloaded") and "\n" not in error["message"]
        assert request_id and (status == 429 or request_id in error["message"])
    assert all(r[3] for r in admitted)  # every admitted stream finished
    latencies = sorted(r[1] for r in admitted)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"\noverload: {len(shed)}/{len(results)} shed, p99 of admitted {p99:.1f} s")
    assert p99 < 120


# ---- faults -----------------------------------------------------------------------------------------------


def test_cache_actor_restart_is_a_miss_not_an_error(base_url):
    from deployments.completion_cache_actor import DEFAULT_ACTOR_NAME, DEFAULT_NAMESPACE

    ray.kill(ray.get_actor(DEFAULT_ACTOR_NAME, namespace=DEFAULT_NAMESPACE), no_restart=False)
    statuses = []
    for i in range(6):
        r = httpx.post(
            f"{base_url}/v1/completions", json=completion(f"Name a colour {i % 2}."), headers=auth(KEY_A), timeout=120
        )
        statuses.append(r.status_code)
    assert statuses == [200] * 6


def _replica_actor():
    names = ray.util.list_named_actors(all_namespaces=True)
    (name,) = [a["name"] for a in names if a["name"].startswith("SERVE_REPLICA::specserve#LLMServer")]
    return ray.get_actor(name, namespace="serve")


@pytest.mark.slow
def test_replica_killed_mid_stream_is_resumed_with_the_same_text(base_url):
    """Last in the file: the replica is replaced. A greedy stream goes on where it stopped, on the new replica."""
    body = {**completion("Write a poem about the sea."), "max_tokens": 48, "ignore_eos": True, "user": "resume"}
    ref = httpx.post(f"{base_url}/v1/completions", json=body, headers=auth(KEY_B), timeout=120).json()
    expected = ref["choices"][0]["text"]
    pieces, lines = [], []
    with httpx.stream(
        "POST", f"{base_url}/v1/completions", json={**body, "stream": True}, headers=auth(KEY_A), timeout=300
    ) as r:
        it = r.iter_lines()
        for line in it:
            lines.append(line)
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:]))
            if len(pieces) == 4:
                ray.kill(_replica_actor(), no_restart=True)
                break
        for line in it:
            lines.append(line)
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:]))
    assert [line for line in lines if line][-1] == "data: [DONE]", lines[-5:]
    assert all("error" not in p for p in pieces), pieces[-1]
    assert pieces[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(p["choices"][0]["text"] for p in pieces) == expected
    assert stats(base_url)["replica"]["num_requests"] == 1  # a new replica finished it: the resumed request
