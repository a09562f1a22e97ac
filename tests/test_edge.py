"""The edge middleware without Ray: request ids, API keys by route, body limits, admission, sanitised 500s."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from deployments.admission import InFlightLimit
from deployments.auth import KeySource
from deployments.edge import Edge, EdgeSettings, RequestTooLarge

KEY, ADMIN = "sk-edge-inference-000000", "sk-edge-admin-1111111111"


def make_app(settings: EdgeSettings) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None)
    gate = asyncio.Event()

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.body()
        except RequestTooLarge as e:
            return JSONResponse(e.body(), status_code=e.status_code)
        if body == b"wait":
            await gate.wait()
        return {"bytes": len(body), "caller": request.state.caller.key_id, "id": request.state.request_id}

    @app.post("/v1/chat/completions")
    async def boom():
        raise RuntimeError('Traceback: File "/home/ray/deployments/ingress.py", pid=4242, ip=10.0.0.7, actor_id=abc')

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/stats")
    async def stats():
        return {"ok": True}

    @app.get("/stream")
    async def stream():
        async def gen():
            yield "a"
            raise RuntimeError("/secret/path mid-stream")

        return StreamingResponse(gen())

    app.add_middleware(Edge, settings=lambda: settings)
    app.state.gate = gate
    return app


@pytest.fixture
def settings():
    keys = KeySource("EDGE_KEYS", None, environ={"EDGE_KEYS": f"{KEY} admin:{ADMIN}"})
    return EdgeSettings(max_body_bytes=1024, keys=keys, limit=InFlightLimit(2, retry_after_s=4))


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_every_answer_carries_a_request_id_and_a_sane_client_id_is_kept(settings):
    client = TestClient(make_app(settings))
    a, b = client.get("/health"), client.get("/health")
    assert a.headers["x-request-id"] != b.headers["x-request-id"]
    kept = client.post("/v1/completions", content=b"{}", headers={**bearer(KEY), "x-request-id": "trace-42"})
    assert kept.json()["id"] == "trace-42" and "x-request-id" not in kept.headers  # echoed by the proxy
    odd = client.get("/health", headers={"x-request-id": "bad id\twith tab"})
    assert odd.headers["x-request-id"] != "bad id\twith tab"


def test_routes_need_their_scope_and_health_is_open(settings):
    client = TestClient(make_app(settings))
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", content=b"{}")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/stats", headers=bearer(KEY)).status_code == 403
    assert client.get("/v1/stats", headers=bearer(ADMIN)).status_code == 200
    assert client.get("/openapi.json", headers=bearer(KEY)).status_code == 403
    assert client.get("/openapi.json", headers=bearer(ADMIN)).status_code == 200
    ok = client.post("/v1/completions", content=b"{}", headers=bearer(KEY))
    assert ok.status_code == 200 and ok.json()["caller"] != KEY and len(ok.json()["caller"]) == 16


def test_body_limit_from_content_length_and_from_the_bytes(settings):
    client = TestClient(make_app(settings))
    assert client.post("/v1/completions", content=b"x" * 1024, headers=bearer(KEY)).json()["bytes"] == 1024
    early = client.post("/v1/completions", content=b"x" * 5000, headers=bearer(KEY))
    assert early.status_code == 413 and early.json()["error"]["code"] == "request_too_large"

    def chunks():
        for _ in range(10):
            yield b"y" * 200

    late = client.post("/v1/completions", content=chunks(), headers=bearer(KEY))
    assert late.status_code == 413


def test_unhandled_errors_are_one_line_with_the_request_id(settings):
    client = TestClient(make_app(settings), raise_server_exceptions=False)
    r = client.post("/v1/chat/completions", content=b"{}", headers=bearer(KEY))
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and r.headers["x-request-id"] in error["message"]
    for leak in ("Traceback", "/home", "pid", "10.0.0.7", "actor_id", "RuntimeError"):
        assert leak not in r.text
    # a stream that already started just ends; nothing of the error reaches the client
    with client.stream("GET", "/stream", headers=bearer(ADMIN)) as s:
        assert "secret" not in "".join(s.iter_text())


def test_in_flight_limit_spans_the_request_and_answers_429_with_retry_after(settings):
    async def scenario():
        import httpx

        app = make_app(settings)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            held = [
                asyncio.create_task(client.post("/v1/completions", content=b"wait", headers=bearer(KEY)))
                for _ in range(2)
            ]
            while settings.limit.in_flight < 2:
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/completions", content=b"{}", headers=bearer(KEY))
            assert (await client.get("/health")).status_code == 200  # not counted
            app.state.gate.set()
            done = await asyncio.gather(*held)
            after = await client.post("/v1/completions", content=b"{}", headers=bearer(KEY))
        return refused, done, after

    refused, done, after = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "4"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200
    assert settings.limit.in_flight == 0


def test_without_settings_it_passes_through():
    app = make_app(EdgeSettings(max_body_bytes=1))
    app.user_middleware.clear()
    app.add_middleware(Edge, settings=lambda: None)
    r = TestClient(app).get("/v1/stats")  # no key needed
    assert r.status_code == 200 and r.headers["x-request-id"]
