"""The benchmarks' client side of one streamed completion: reads the SSE stream to its end and times it."""

from __future__ import annotations

import json
import time

import httpx


async def stream_completion(client: httpx.AsyncClient, url: str, path: str, body: dict) -> dict:
    """POST `body` (with "stream": true) to url + path; text, completion tokens (from `usage`, so ask for
    `stream_options.include_usage`), time to first visible text, latency and the replica that answered.
    An HTTP error or an error event raises RuntimeError."""
    text, tokens, ttft = [], 0, None
    t0 = time.perf_counter()
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        replica = r.headers.get("x-specserve-replica", "")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(piece)
    latency = time.perf_counter() - t0
    return {"text": "".join(text), "tokens": tokens, "ttft_s": ttft, "latency_s": latency, "replica": replica}
