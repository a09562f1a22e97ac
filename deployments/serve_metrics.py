"""The service's Prometheus metrics, all in Ray's metrics (`ray.serve.metrics`), and their way back out.

Each metric is recorded in the process where its event happens: requests and completion-cache lookups in the
ingress (`IngressMetrics`), the engine's numbers in each target replica (`EngineMetrics`). `ray.serve.metrics`
tags every series with its deployment, replica and application, so engine metrics come labelled by replica.
Ray's metrics agent on each node exports what every process on it recorded (Prometheus text, names prefixed
`ray_`, counters suffixed `_total`), on the port `ray.nodes()` lists as `MetricsExportPort`: the same targets
Ray's own Prometheus service discovery writes. `MetricsRelay` reads them back for the ingress's `/metrics`, so
one scrape of the app shows everything, with nothing kept in a registry of our own. Ray exports recorded
values every `metrics_report_interval_ms` (10 s by default), so a scrape lags the events by up to that much.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

import httpx
from ray.serve.metrics import Counter, Gauge, Histogram

from engine.metrics import RequestMetrics
from engine.spec_monitor import DEFAULT_CLASS, FIRST_VERSION, SpecKey, SpecStats

log = logging.getLogger("ray.serve")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Request-level latencies (TTFT, queue time, end to end) and per-token gaps, in seconds.
LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0]
TOKEN_GAP_BUCKETS_S = [0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0]
SPEC_LABELS = ("class", "speculator", "version")  # speculator: the drafter (engine/spec_monitor.py's key)


def _start_at_zero(counter: Counter, tags: dict[str, str] | None = None) -> None:
    """Export the series at 0 from the start: a counter that never moved (no preemption yet) would otherwise be
    missing, and dashboards would show no data instead of a zero rate. Ray's public `inc` refuses 0."""
    counter._record(0, tags=tags)


class IngressMetrics:
    """Recorded by the ingress: HTTP requests by route and status, completion-cache lookups, completion tokens
    returned to clients (cache replays included), requests being answered."""

    def __init__(self) -> None:
        self._requests = Counter("specserve_requests", "HTTP requests by route and status", ("route", "status"))
        self._cache = Counter("specserve_completion_cache_lookups", "completion cache lookups", tag_keys=("result",))
        self._tokens = Counter("specserve_completion_tokens", "completion tokens returned to clients")
        _start_at_zero(self._tokens)
        self._in_flight_gauge = Gauge("specserve_requests_in_flight", "completion requests being answered")
        self._in_flight = 0
        self._in_flight_gauge.set(0)

    def request(self, route: str, status: int) -> None:
        self._requests.inc(tags={"route": route, "status": str(status)})

    def cache_lookup(self, result: str) -> None:
        self._cache.inc(tags={"result": result})

    def completion_tokens(self, n: int) -> None:
        if n > 0:
            self._tokens.inc(n)

    def in_flight(self, delta: int) -> None:
        self._in_flight += delta
        self._in_flight_gauge.set(self._in_flight)


class EngineMetrics:
    """Recorded by a target replica: token counts per request, latency histograms per finished request, and the
    engine's own counters (`LLMEngine.stats()`) and its speculation by class, drafter and version
    (`LLMEngine.spec_snapshot()`); `publish` and `publish_spec` run every few seconds on a thread of their own."""

    def __init__(self, speculator: str) -> None:
        self._gauges = {
            "num_running": Gauge("specserve_running_sequences", "sequences in the running batch"),
            "num_waiting": Gauge("specserve_waiting_sequences", "sequences waiting for a batch slot or KV blocks"),
            "kv_used": Gauge("specserve_kv_blocks_used", "KV cache blocks held by sequences or cached prefixes"),
            "kv_free": Gauge("specserve_kv_blocks_free", "KV cache blocks free"),
            "hit_rate": Gauge("specserve_prefix_cache_hit_rate", "share of prompt tokens found in the prefix cache"),
        }
        # engine stats key -> counter fed with its increase since the last publish
        self._counters = {
            "num_preemptions": Counter("specserve_preemptions", "sequences preempted (recomputed later)"),
            "prefix_queried_tokens": Counter(
                "specserve_prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache on admission"
            ),
            "prefix_hit_tokens": Counter(
                "specserve_prefix_cache_hit_tokens", "prompt tokens whose KV the prefix cache held on admission"
            ),
        }
        for counter in self._counters.values():
            _start_at_zero(counter)
        self._last: dict[str, int] = {}
        self._spec_drafted = Counter(
            "specserve_spec_draft_tokens", "draft tokens proposed for verification", SPEC_LABELS
        )
        self._spec_accepted = Counter("specserve_spec_accepted_tokens", "draft tokens the target accepted", SPEC_LABELS)
        self._spec_version = Gauge(
            "specserve_speculator_version", "version of the drafter in use, by class", ("class", "speculator")
        )
        self._spec_by_position = Gauge(
            "specserve_spec_acceptance_by_position",
            "acceptance of draft position j over the recent requests",
            (*SPEC_LABELS, "position"),
        )
        self._spec_tokens_per_step = Gauge(
            "specserve_spec_tokens_per_step", "tokens per verification step over the recent requests", SPEC_LABELS
        )
        self._spec_last: dict[SpecKey, tuple[int, int]] = {}  # drafted, accepted as last published
        if speculator != "auto":  # without classes every request drafts with the configured speculator
            tags = {"class": DEFAULT_CLASS, "speculator": speculator, "version": FIRST_VERSION}
            _start_at_zero(self._spec_drafted, tags)
            _start_at_zero(self._spec_accepted, tags)
        self._prompt_tokens = Counter("specserve_prompt_tokens", "prompt tokens prefilled (a resume: with its output)")
        self._generation_tokens = Counter("specserve_generation_tokens", "tokens generated")
        _start_at_zero(self._prompt_tokens)
        _start_at_zero(self._generation_tokens)
        self._ttft = Histogram(
            "specserve_time_to_first_token_seconds", "engine arrival to first token", LATENCY_BUCKETS_S
        )
        self._itl = Histogram(
            "specserve_inter_token_latency_seconds", "gap between streamed tokens", TOKEN_GAP_BUCKETS_S
        )
        self._queue = Histogram("specserve_queue_time_seconds", "engine arrival to first scheduled", LATENCY_BUCKETS_S)
        self._e2e = Histogram("specserve_e2e_latency_seconds", "engine arrival to last token", LATENCY_BUCKETS_S)

    def request_started(self, prompt_tokens: int) -> None:
        self._prompt_tokens.inc(prompt_tokens)

    def request_ended(self, generated_tokens: int, metrics: RequestMetrics | None) -> None:
        """A request left the replica: its tokens always count, its latencies only if it finished (not an
        abort or an engine error). A gap per token: 1,000 observations took 1.4 ms in a Ray worker."""
        if generated_tokens > 0:
            self._generation_tokens.inc(generated_tokens)
        if metrics is None or metrics.finished is None:
            return
        latencies = ((self._ttft, metrics.ttft), (self._queue, metrics.queue_time), (self._e2e, metrics.latency))
        for hist, value in latencies:
            if value is not None:
                hist.observe(max(value, 0.0))
        for gap in metrics.inter_token:
            self._itl.observe(gap)

    def publish(self, stats: Mapping[str, int]) -> None:
        """Gauges from the engine's counters; cumulative counters advance by their increase since last time."""
        g = self._gauges
        g["num_running"].set(stats["num_running"])
        g["num_waiting"].set(stats["num_waiting"])
        usable = stats["total_kv_blocks"] - 1  # block 0 is reserved
        g["kv_free"].set(stats["free_kv_blocks"])
        g["kv_used"].set(max(usable - stats["free_kv_blocks"], 0))
        queried = stats.get("prefix_queried_tokens", 0)
        g["hit_rate"].set(stats.get("prefix_hit_tokens", 0) / queried if queried else 0.0)
        for key, counter in self._counters.items():
            now = int(stats.get(key, 0))
            delta = now - self._last.get(key, 0)
            self._last[key] = now
            if delta > 0:
                counter.inc(delta)

    def publish_spec(self, snapshot: Mapping[SpecKey, SpecStats]) -> None:
        """Speculation counters by class, drafter and version advance by their increase since last time; the
        window's tokens per step and acceptance by position are gauges; per class and drafter its latest version
        (a version that is not a number shows as NaN)."""
        latest: dict[tuple[str, str], SpecStats] = {}
        for key, stats in snapshot.items():
            tags = {"class": key.workload_class, "speculator": key.drafter, "version": key.version}
            drafted, accepted = self._spec_last.get(key, (0, 0))
            if stats.total.drafted > drafted:
                self._spec_drafted.inc(stats.total.drafted - drafted, tags=tags)
            if stats.total.accepted > accepted:
                self._spec_accepted.inc(stats.total.accepted - accepted, tags=tags)
            self._spec_last[key] = (stats.total.drafted, stats.total.accepted)
            if stats.window.steps:
                self._spec_tokens_per_step.set(stats.window_tokens_per_step, tags=tags)
            for j, rate in enumerate(stats.window_acceptance_by_position()):
                self._spec_by_position.set(rate, tags={**tags, "position": str(j)})
            pair = (key.workload_class, key.drafter)
            if pair not in latest or stats.order > latest[pair].order:
                latest[pair] = stats
        for (workload_class, drafter), stats in latest.items():
            self._spec_version.set(_as_number(stats.key.version), tags={"class": workload_class, "speculator": drafter})


def _as_number(version: str) -> float:
    try:
        return float(version)
    except ValueError:
        return float("nan")


class Every:
    """Calls `fn` every `period_s` seconds on a daemon thread until `stop()`; an exception is logged, not fatal."""

    def __init__(self, period_s: float, fn: Callable[[], None], name: str = "metrics") -> None:
        self._fn, self._period_s = fn, period_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._period_s):
            try:
                self._fn()
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                log.exception("publishing metrics failed")

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


# ---- reading Ray's export back --------------------------------------------------------------------------


def node_metrics_targets() -> list[str]:
    """`host:port` of every alive node's metrics export (as Ray's Prometheus service discovery lists them)."""
    import ray

    return [
        f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
        for node in ray.nodes()
        if node.get("Alive", node.get("alive")) and (node.get("MetricsExportPort") or 0) > 0
    ]


def merge_expositions(texts: Iterable[str]) -> str:
    """Several Prometheus text expositions as one: a family's HELP/TYPE once, its samples from every text
    (the first of two identical series wins), so that a scrape of several nodes parses as one target."""
    families: dict[str, tuple[list[str], list[str]]] = {}  # name -> (header lines, sample lines)
    seen: set[str] = set()
    for text in texts:
        name = ""
        for line in text.splitlines():
            if not line.strip() or line.startswith("# EOF"):
                continue
            if line.startswith(("# HELP ", "# TYPE ")):
                kind, name = line[2:6], line.split(" ", 3)[2]
                header, _ = families.setdefault(name, ([], []))
                if not any(h[2:6] == kind for h in header):
                    header.append(line)
                continue
            if line.startswith("#"):
                continue
            series = line.rsplit(" ", 1)[0]
            if series in seen:
                continue
            seen.add(series)
            families.setdefault(name, ([], []))[1].append(line)
    return "".join(line + "\n" for header, samples in families.values() for line in (*header, *samples))


class MetricsRelay:
    """Scrapes every node's metrics export concurrently and merges them; a node that does not answer in
    `timeout_s` is left out (and named in a comment line). The node list is re-read every `targets_ttl_s`."""

    def __init__(
        self,
        targets: Callable[[], list[str]] = node_metrics_targets,
        timeout_s: float = 5.0,
        targets_ttl_s: float = 30.0,
        fetch: Callable[[str], Awaitable[str]] | None = None,
    ) -> None:
        self._targets, self._timeout_s, self._ttl_s = targets, timeout_s, targets_ttl_s
        self._fetch = fetch or self._http_get
        self._cached: tuple[float, list[str]] | None = None

    async def targets(self) -> list[str]:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self._ttl_s:
            self._cached = (now, await asyncio.to_thread(self._targets))  # a GCS call: off the event loop
        return self._cached[1]

    async def _http_get(self, target: str) -> str:
        async with httpx.AsyncClient(timeout=self._timeout_s) as client:
            r = await client.get(f"http://{target}/metrics")
            r.raise_for_status()
            return r.text

    async def scrape(self) -> str:
        targets = await self.targets()
        results = await asyncio.gather(*(self._fetch(t) for t in targets), return_exceptions=True)
        texts, missing = [], []
        for target, result in zip(targets, results):
            if isinstance(result, BaseException):
                log.warning("metrics export at %s unreachable: %s", target, result)
                missing.append(target)
                self._cached = None  # maybe the node is gone: re-read the list next time
            else:
                texts.append(result)
        merged = await asyncio.to_thread(merge_expositions, texts) if len(texts) > 1 else "".join(texts)
        return "".join(f"# metrics export at {t} did not answer\n" for t in missing) + merged
