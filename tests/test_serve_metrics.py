"""Metrics plumbing without a cluster: merging node exports, the relay, engine counters published as deltas,
and the choice between our request router and Ray's."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.serve_metrics import EngineMetrics, MetricsRelay, merge_expositions
from engine.metrics import RequestMetrics

NODE_A = """# HELP ray_specserve_requests_total HTTP requests
# TYPE ray_specserve_requests_total counter
ray_specserve_requests_total{route="chat",status="200",NodeAddress="10.0.0.1"} 3.0
# HELP ray_specserve_kv_blocks_free KV cache blocks free
# TYPE ray_specserve_kv_blocks_free gauge
ray_specserve_kv_blocks_free{replica="a",NodeAddress="10.0.0.1"} 100.0
"""
NODE_B = """# HELP ray_specserve_kv_blocks_free KV cache blocks free
# TYPE ray_specserve_kv_blocks_free gauge
ray_specserve_kv_blocks_free{replica="b",NodeAddress="10.0.0.2"} 7.0
ray_specserve_kv_blocks_free{replica="a",NodeAddress="10.0.0.1"} 99.0
# HELP ray_specserve_ttft_seconds time to first token
# TYPE ray_specserve_ttft_seconds histogram
ray_specserve_ttft_seconds_bucket{le="0.1",replica="b"} 1.0
ray_specserve_ttft_seconds_bucket{le="+Inf",replica="b"} 2.0
ray_specserve_ttft_seconds_count{replica="b"} 2.0
ray_specserve_ttft_seconds_sum{replica="b"} 0.7
"""


def families(text: str) -> dict:
    found = {}
    for f in text_string_to_metric_families(text):
        assert f.name not in found, f"family {f.name} appears twice"
        found[f.name] = f
    return found


def test_node_exports_merge_into_one_family_each():
    merged = merge_expositions([NODE_A, NODE_B])
    fams = families(merged)
    assert set(fams) == {"ray_specserve_requests", "ray_specserve_kv_blocks_free", "ray_specserve_ttft_seconds"}
    free = {s.labels["replica"]: s.value for s in fams["ray_specserve_kv_blocks_free"].samples}
    assert free == {"a": 100.0, "b": 7.0}  # the repeated series keeps its first value
    assert merged.count("# TYPE ray_specserve_kv_blocks_free gauge") == 1
    assert fams["ray_specserve_ttft_seconds"].type == "histogram"
    assert merge_expositions([NODE_A]) == NODE_A


def test_relay_leaves_out_a_node_that_does_not_answer():
    async def fetch(target: str) -> str:
        if target == "down:1":
            raise OSError("connection refused")
        return {"a:1": NODE_A, "b:1": NODE_B}[target]

    calls = []

    def targets():
        calls.append(1)
        return ["a:1", "down:1", "b:1"]

    relay = MetricsRelay(targets=targets, fetch=fetch)
    text = asyncio.run(relay.scrape())
    assert "# metrics export at down:1 did not answer" in text
    assert len(families(text)["ray_specserve_kv_blocks_free"].samples) == 2
    asyncio.run(relay.scrape())
    assert len(calls) == 2  # a node that did not answer makes the next scrape re-read the node list


class FakeCounter:
    def __init__(self):
        self.calls = []

    def inc(self, value, tags=None):
        self.calls.append((value, tags))


class FakeHistogram:
    def __init__(self):
        self.values = []

    def observe(self, value):
        self.values.append(value)


STATS = {"num_running": 2, "num_waiting": 1, "free_kv_blocks": 60, "total_kv_blocks": 101}


def test_engine_counters_are_published_as_increases_and_latencies_per_finished_request():
    m = EngineMetrics("ngram")
    m._counters = {k: FakeCounter() for k in m._counters}
    for name in ("_ttft", "_itl", "_queue", "_e2e"):
        setattr(m, name, FakeHistogram())
    m.publish({**STATS, "prefix_hit_tokens": 10, "num_preemptions": 0})
    m.publish({**STATS, "prefix_hit_tokens": 25, "num_preemptions": 1})
    assert m._counters["prefix_hit_tokens"].calls == [(10, None), (15, None)]
    assert m._counters["num_preemptions"].calls == [(1, None)]  # no increase, no call

    r = RequestMetrics(arrival=0.0, scheduled=0.25, first_token=0.5, finished=2.0, inter_token=[0.1, 0.2, 0.3])
    m.request_ended(4, r)
    m.request_ended(3, RequestMetrics())  # aborted: no latencies
    assert m._ttft.values == [0.5] and m._queue.values == [0.25] and m._e2e.values == [2.0]
    assert m._itl.values == [0.1, 0.2, 0.3]


class FakeGauge:
    def __init__(self):
        self.values = {}

    def set(self, value, tags=None):
        self.values[tuple(sorted((tags or {}).items()))] = value


def test_speculation_is_published_by_class_drafter_and_version():
    from engine.spec_monitor import SpecKey, SpecMonitor

    m = EngineMetrics("auto")
    for name in ("_spec_drafted", "_spec_accepted"):
        setattr(m, name, FakeCounter())
    for name in ("_spec_version", "_spec_by_position", "_spec_tokens_per_step"):
        setattr(m, name, FakeGauge())
    monitor = SpecMonitor()
    code0 = monitor.track(SpecKey("code", "ngram", "0"))
    monitor.record(code0, 3, 2, 3)
    monitor.finish(code0)
    m.publish_spec(monitor.snapshot())
    code1 = monitor.track(SpecKey("code", "ngram", "1"))
    monitor.record(code1, 2, 0, 1)
    monitor.finish(code1)
    m.publish_spec(monitor.snapshot())
    v0 = {"class": "code", "speculator": "ngram", "version": "0"}
    v1 = {**v0, "version": "1"}
    assert m._spec_drafted.calls == [(3, v0), (2, v1)]  # each series by its own increase, once
    assert m._spec_accepted.calls == [(2, v0)]
    assert m._spec_version.values == {(("class", "code"), ("speculator", "ngram")): 1.0}
    by_pos = {dict(k)["version"] + dict(k)["position"]: v for k, v in m._spec_by_position.values.items()}
    assert by_pos == {"00": 1.0, "01": 1.0, "02": 0.0, "10": 0.0, "11": 0.0}
    per_step = {dict(k)["version"]: v for k, v in m._spec_tokens_per_step.values.items()}
    assert per_step == {"0": 3.0, "1": 1.0}


def test_router_setting_picks_ours_or_rays():
    from deployments.app import server_options
    from deployments.app_config import load_app_config

    ours = server_options(load_app_config({}))["request_router_config"]
    assert ours.request_router_class.endswith("request_router:PrefixAffinityRouter")
    ray_cfg = load_app_config({"ingress": {"prefix_affinity": {"router": "ray", "imbalance_threshold": 3}}})
    theirs = server_options(ray_cfg)["request_router_config"]
    assert theirs.request_router_class.endswith("ray_prefix_router:RayPrefixCacheRouter")
    assert theirs.request_router_kwargs == {"imbalanced_threshold": 3}
    with pytest.raises(ValueError, match="router"):
        load_app_config({"ingress": {"prefix_affinity": {"router": "round-robin"}}})


def test_rays_router_reads_our_engine_requests():
    from deployments.ray_prefix_router import RayPrefixCacheRouter

    router = object.__new__(RayPrefixCacheRouter)  # text extraction needs no router state

    def text(request: dict) -> str:
        return router._extract_text_from_request(SimpleNamespace(args=[request], kwargs={}))

    assert text({"prompt": "hello there", "params": {}}) == "hello there"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert text({"messages": messages}) == "be briefhi"  # Ray's own normalization
    assert text({"prompt_token_ids": [5, 6, 7], "resume": {}}) == "5 6 7"  # a resumed request
    assert text({"params": {}}) == " "  # never empty: Ray's router divides by its length


def exported_series() -> dict[str, str]:
    """Series name -> the family the app records it as, as Ray's export names them."""
    from ray.util.metrics import Counter, Histogram, Metric

    from deployments.serve_metrics import IngressMetrics

    found = {}
    for owner in (IngressMetrics(), EngineMetrics("ngram")):
        for value in vars(owner).values():
            for metric in value.values() if isinstance(value, dict) else [value]:
                if not isinstance(metric, Metric):
                    continue
                family = "ray_" + metric.info["name"]
                if isinstance(metric, Counter):
                    suffixes = ("_total",)
                elif isinstance(metric, Histogram):
                    suffixes = ("_bucket", "_sum", "_count")
                else:
                    suffixes = ("",)
                found.update({family + s: family for s in suffixes})
    return found


def test_dashboard_queries_only_exported_series_and_shows_every_family():
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[1] / "cluster" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"ray_specserve_\w+", e)}
    series = exported_series()
    assert used <= set(series), sorted(used - set(series))
    assert {series[n] for n in used} == set(series.values())  # every family is on some panel
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "replica"}
