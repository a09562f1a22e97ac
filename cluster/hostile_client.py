"""The client side of the fault, cancellation and overload checks, shared by the tests and scripts/hostile_run.py.

Every request is classified the way a client experiences it (`Outcome.kind`):
- `completed`: HTTP 200 and a finish reason (for a stream: the last choice chunk has one, then `data: [DONE]`);
- `error`: an OpenAI-shaped error, either as the HTTP body (4xx/5xx) or, for a stream already answered with
  200, as an error event followed by `data: [DONE]`;
- `silent`: anything else: a body cut off mid-stream, a stream without finish reason, error or [DONE], a
  non-OpenAI error body. The service standard is zero of these, whatever was killed.
Disconnects close the connection at a chosen point of a request's life; overload bursts count what was shed.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import yaml

from cluster.local_cluster import REPO
from deployments.app_config import DEFAULT_SERVED_MODEL_NAME

# Actor classes to SIGKILL, and whether every stream in flight must still complete: the replica repairs a
# dead draft worker, shards or block manager and recomputes, and a dead cache is a miss; a dead ingress or
# replica takes its streams with it unless they are resumed elsewhere (else an error event ends them).
VICTIMS = {
    "draft_worker": ("DraftWorker", True),
    "shards": ("ShardWorker", True),
    "block_manager": ("BlockManagerActor", True),
    "completion_cache": ("CompletionCacheActor", True),
    "ingress": ("ServeReplica:{app}:Ingress", False),
    "replica": ("ServeReplica:{app}:LLMServer", False),
}


def victim_class(victim: str, app: str = "specserve") -> str:
    return VICTIMS[victim][0].format(app=app)


def fault_app_config(tensor_parallel_size: int = 2, cache: bool = True) -> dict[str, Any]:
    """serve_config.yaml with every actor a fault can hit and CI-sized settings: tensor-parallel shards, a
    draft worker (2 layers), the block manager actor, one fixed replica. With `cache` the completion cache is
    looked up on every request but admits nothing, so every stream reaches the replica."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    args["engine"].update(
        kv_cache_gib=0.1, max_model_len=512, speculator="draft", draft_num_layers=2, draft_kv_cache_gib=0.05
    )
    args["tensor_parallel_size"] = tensor_parallel_size
    args["draft_worker"]["enabled"] = True
    target = args["target"]
    target.pop("autoscaling_config", None)
    target["num_replicas"] = 1
    target["block_manager_actor"] = True
    args["ingress"]["completion_cache"].update(enabled=cache, admit_after=255)
    args["ingress"]["prefix_affinity"]["stats_period_s"] = 0.5
    return config


COMPLETIONS = "/v1/completions"
KINDS = ("completed", "error", "silent")


def completion_body(prompt: str, max_tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    """A greedy `/v1/completions` body that runs to `max_tokens` (ignore_eos): its text is reproducible."""
    return {
        "model": DEFAULT_SERVED_MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": True,
        **extra,
    }


@dataclass
class Outcome:
    """What one request looked like from the client."""

    status: int = 0  # HTTP status; 0 = no response at all
    text: str = ""
    finish_reason: str | None = None
    error: dict[str, Any] | None = None  # the OpenAI error object, from the body or an error event
    done: bool = False  # a stream's `data: [DONE]` arrived
    broken: str | None = None  # the transport failed (cut chunked body, reset, timeout)
    retry_after: str | None = None
    latency_s: float = 0.0
    chunks: int = 0

    @property
    def kind(self) -> str:
        if self.broken is None and self.status == 200 and self.error is None and self.finish_reason is not None:
            return "completed" if self.done or self.chunks == 0 else "silent"  # chunks == 0: a JSON answer
        if self.broken is None and self.error is not None and (self.status != 200 or self.done):
            return "error"
        return "silent"

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "status": self.status,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "done": self.done,
            "broken": self.broken,
            "chunks": self.chunks,
            "text_chars": len(self.text),
        }


def _openai_error(body: Any) -> dict[str, Any] | None:
    """The error object if `body` is OpenAI-shaped ({"error": {"message", "type", ...}}), else None."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        if isinstance(err.get("message"), str) and "type" in err:
            return err
    return None


def _piece(choice: dict[str, Any]) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def request(
    url: str,
    body: dict[str, Any],
    path: str = COMPLETIONS,
    on_chunk: Callable[[int], None] | None = None,
    timeout: float = 600,
    headers: dict[str, str] | None = None,
) -> Outcome:
    """Send one request (streamed if `body["stream"]`) and classify how it ended; never raises for transport
    failures (they are the point). `on_chunk(n)` runs after the n-th streamed choice chunk."""
    out = Outcome()
    start = time.perf_counter()
    try:
        with httpx.stream("POST", url + path, json=body, timeout=timeout, headers=headers) as r:
            out.status = r.status_code
            out.retry_after = r.headers.get("retry-after")
            if r.status_code != 200 or not body.get("stream"):
                raw = r.read()
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    parsed = None
                out.error = _openai_error(parsed)
                if r.status_code == 200 and isinstance(parsed, dict) and parsed.get("choices"):
                    choice = parsed["choices"][0]
                    out.text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
                    out.finish_reason = choice.get("finish_reason")
                return out
            pieces = []
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.done = True
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    out.error = _openai_error(event) or {"message": repr(event), "type": None}
                    continue
                for choice in event.get("choices") or []:
                    pieces.append(_piece(choice))
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
                    out.chunks += 1
                    if on_chunk is not None:
                        on_chunk(out.chunks)
            out.text = "".join(pieces)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out.broken = f"{type(e).__name__}: {e}"
    finally:
        out.latency_s = time.perf_counter() - start
    return out


def explain(outcomes: Iterable[Outcome], kind: str | None = None) -> str:
    """The outcomes (of one kind, if given) as one JSON line, for assertion messages."""
    return json.dumps([o.summary() for o in outcomes if kind is None or o.kind == kind])


def count_kinds(outcomes: Iterable[Outcome]) -> dict[str, int]:
    kinds = Counter(o.kind for o in outcomes)
    return {k: kinds.get(k, 0) for k in KINDS}


def streams_under_fault(
    url: str,
    bodies: list[dict[str, Any]],
    fault: Callable[[], Any],
    after: int = 3,
    path: str = COMPLETIONS,
    wait_s: float = 300,
) -> tuple[list[Outcome], Any, float]:
    """Start one stream per body; once every stream has `after` chunks (or ended, or `wait_s` passed) run
    `fault()`. Returns the outcomes, what `fault` returned and when it ran (time.time())."""
    outcomes: list[Outcome | None] = [None] * len(bodies)
    reached = [threading.Event() for _ in bodies]

    def run(i: int) -> None:
        def chunk(n: int) -> None:
            if n >= after:
                reached[i].set()

        try:
            outcomes[i] = request(url, bodies[i], path, on_chunk=chunk)
        finally:
            reached[i].set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    deadline = time.time() + wait_s
    for e in reached:
        e.wait(timeout=max(0.0, deadline - time.time()))
    fault_at = time.time()
    result = fault()
    for t in threads:
        t.join()
    return [o for o in outcomes if o is not None], result, fault_at


def time_to_serve(
    url: str,
    body: dict[str, Any],
    since: float,
    timeout_s: float = 300,
    expect_text: str | None = None,
    path: str = COMPLETIONS,
    period_s: float = 0.5,
) -> tuple[float | None, list[Outcome]]:
    """Poll with `body` until a request completes (with `expect_text`, if given): seconds from `since`
    (time.time()) to that answer, or None after `timeout_s`; and every poll's outcome (none may be silent)."""
    polls = []
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        out = request(url, body, path, timeout=max(1.0, deadline - time.time()))
        polls.append(out)
        if out.kind == "completed" and (expect_text is None or out.text == expect_text):
            return time.time() - since, polls
        time.sleep(period_s)
    return None, polls


def wait_deployed(cluster: Any, timeout_s: float, app: str = "specserve") -> float:
    """After `serve deploy`: seconds until the app answers a completion; RuntimeError at once if the deploy
    failed, TimeoutError after `timeout_s`."""
    start = time.time()
    probe = completion_body("Hello", 1, stream=False)
    while time.time() - start < timeout_s:
        status = cluster.status()
        if status.get("status") == "DEPLOY_FAILED":
            why = [status.get("message", "")] + [d.get("message", "") for d in status.get("deployments", {}).values()]
            raise RuntimeError(f"serve deploy failed: {' | '.join(m for m in why if m)[-3000:]}")
        if request(cluster.url, probe, timeout=60).kind == "completed":
            return time.time() - start
        time.sleep(1)
    raise TimeoutError(f"{app} did not serve within {timeout_s} s: {cluster.status()}")


# ---- server state ------------------------------------------------------------------------------------


def stats(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The replica's counters from /v1/stats."""
    return httpx.get(f"{url}/v1/stats", timeout=60, headers=headers).json()["replica"]


def held(replica: dict[str, Any]) -> dict[str, int]:
    """What a replica still holds: sequences running or waiting, KV blocks in use (block 0 is never handed
    out), sequences the block manager knows."""
    bm = replica.get("block_manager") or {}
    if "num_blocks" in bm:
        blocks = bm["num_blocks"] - 1 - bm["num_free_blocks"]
    else:
        blocks = replica["total_kv_blocks"] - 1 - replica["free_kv_blocks"]
    return {
        "running": replica["num_running"],
        "waiting": replica["num_waiting"],
        "blocks_held": blocks,
        "block_manager_seqs": bm.get("num_seqs", 0),
    }


def wait_until_idle(
    url: str, timeout_s: float, headers: dict[str, str] | None = None
) -> tuple[dict[str, int], float | None]:
    """Poll /v1/stats until the replica holds nothing; the last reading and the seconds it took (None if
    it still held something after `timeout_s`)."""
    start = time.time()
    last: dict[str, int] = {}
    while True:
        try:
            last = held(stats(url, headers))
        except (httpx.HTTPError, KeyError, ValueError) as e:
            last = {"error": repr(e)}  # type: ignore[dict-item]
        if last and all(v == 0 for v in last.values() if isinstance(v, int)) and "error" not in last:
            return last, time.time() - start
        if time.time() - start > timeout_s:
            return last, None
        time.sleep(0.5)


# ---- disconnects and overload (asyncio: hundreds of requests on one thread) ---------------------------

DISCONNECT_POINTS = ("before_headers", "after_headers", "mid_stream", "non_stream")


async def disconnect_one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], point: str, rng: random.Random, path: str
) -> str:
    """Send `body` and drop the connection at `point`; returns where it was actually dropped (a request that
    finished first says 'finished')."""
    body = {**body, "stream": point != "non_stream"}
    state = {"at": "before_headers"}

    async def go() -> str:
        async with client.stream("POST", url + path, json=body) as r:
            state["at"] = "after_headers" if body["stream"] else "non_stream"
            if point == "after_headers":
                return point
            want = rng.randint(1, 8) if point == "mid_stream" else None
            n = 0
            async for line in r.aiter_lines():
                if body["stream"] and line.startswith("data: {"):
                    n += 1
                    state["at"] = "mid_stream"
                    if want is not None and n >= want:
                        return point
            return "finished"

    if point in ("before_headers", "non_stream"):
        try:  # the client gives up after a random wait, wherever the request has got to by then
            return await asyncio.wait_for(go(), timeout=rng.uniform(0.05, 2.0))
        except TimeoutError:
            return "non_stream" if point == "non_stream" else state["at"]
    return await go()


async def disconnect_many(
    url: str,
    n: int,
    make_body: Callable[[int], dict[str, Any]],
    concurrency: int = 16,
    seed: int = 0,
    path: str = COMPLETIONS,
    headers: dict[str, str] | None = None,
) -> dict[str, int]:
    """`n` requests, `concurrency` at a time, each dropped at a random point; how many were dropped where."""
    rng = random.Random(seed)
    points = [rng.choice(DISCONNECT_POINTS) for _ in range(n)]
    sem = asyncio.Semaphore(concurrency)
    where: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:

        async def one(i: int) -> None:
            async with sem:
                try:
                    where[await disconnect_one(client, url, make_body(i), points[i], rng, path)] += 1
                except httpx.HTTPError as e:
                    where[f"transport:{type(e).__name__}"] += 1

        await asyncio.gather(*(one(i) for i in range(n)))
    return dict(where)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def burst(
    url: str,
    bodies: list[dict[str, Any]],
    path: str = COMPLETIONS,
    timeout: float = 600,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Send every body at once; what was shed (429/503, with or without Retry-After), what was served and
    how long the served ones took."""
    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:

        async def one(body: dict[str, Any]) -> tuple[int, float, str | None, bool]:
            start = time.perf_counter()
            try:
                r = await client.post(url + path, json=body)
            except httpx.HTTPError:
                return 0, time.perf_counter() - start, None, False
            shaped = False
            try:
                shaped = _openai_error(r.json()) is not None
            except ValueError:
                pass
            return r.status_code, time.perf_counter() - start, r.headers.get("retry-after"), shaped

        results = await asyncio.gather(*(one(b) for b in bodies))
    statuses = Counter(s for s, _, _, _ in results)
    admitted = [t for s, t, _, _ in results if s == 200]
    shed = [(s, ra, shaped) for s, _, ra, shaped in results if s in (429, 503)]
    return {
        "requests": len(bodies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "served": len(admitted),
        "shed": len(shed),
        "share_shed": round(len(shed) / len(bodies), 3),
        "shed_with_retry_after": sum(ra is not None for _, ra, _ in shed),
        "shed_openai_shaped": sum(shaped for _, _, shaped in shed),
        "admitted_p50_s": percentile(admitted, 50),
        "admitted_p99_s": percentile(admitted, 99),
        "admitted_max_s": max(admitted) if admitted else None,
    }
