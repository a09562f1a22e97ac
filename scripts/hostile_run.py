"""The longer hostile run: disconnects, overload and actor kills against the service; prints one JSON object.

    .venv/bin/python scripts/hostile_run.py [--url URL [--dashboard URL]] [--cancel 1000] [--capacity N]
                                            [--overload-factor 4] [--kill-streams 8] [--no-kills] [--out F.json]

Without `--url` it starts its own `ray start --head` cluster and deploys the app as the fault tests do
(tensor_parallel_size 2, draft worker, block manager and completion cache actors; cluster/hostile_client.py).
Against a running service, actor kills need `--dashboard` (Ray's dashboard, on this host: kills are SIGKILLs).
- cancel: `--cancel` requests dropped at random points (before the headers, after them, mid-stream, non-streamed
  while waiting), then what the replica still holds (goal: nothing) and how long it took to let go;
- overload: `--overload-factor` x `--capacity` requests at once (capacity: sequences a replica runs at once,
  engine.max_num_seqs of the deployed config by default): the share shed (429/503, with Retry-After) and the
  latency of the admitted ones (p50, p99);
- kills: per actor, `--kill-streams` greedy streams in flight at the SIGKILL; how many completed, ended with an
  error event, ended silently (goal 0), and the seconds until a new request is served again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from cluster import hostile_client as hc
from cluster.local_cluster import LocalCluster, kill_actors

PROMPT = "def bubble_sort(items):\n    "


def story(i: int, max_tokens: int) -> dict:
    animal = ["fox", "owl", "cat", "eel", "yak", "bee"][i % 6]
    return hc.completion_body(f"Story {i}: a long tale of a {animal} who ", max_tokens)


def run_cancel(url: str, n: int, concurrency: int, headers: dict | None) -> dict:
    start = time.time()
    where = asyncio.run(
        hc.disconnect_many(url, n, lambda i: story(i, 256), concurrency=concurrency, seed=n, headers=headers)
    )
    wall = time.time() - start
    left, idle_s = hc.wait_until_idle(url, 120, headers=headers)
    return {"requests": n, "dropped_at": where, "wall_s": round(wall, 1), "idle_after_s": idle_s, "held_after": left}


def run_overload(url: str, capacity: int, factor: float, headers: dict | None) -> dict:
    n = int(capacity * factor)
    bodies = [story(i, 32) | {"stream": False} for i in range(n)]
    return {"capacity": capacity, "factor": factor, **asyncio.run(hc.burst(url, bodies, headers=headers))}


def run_kill(url: str, dashboard: str, victim: str, streams: int, reference: str, headers: dict | None) -> dict:
    class_name = hc.victim_class(victim)
    bodies = [hc.completion_body(PROMPT, 40) for _ in range(streams)]
    outcomes, killed, at = hc.streams_under_fault(url, bodies, lambda: kill_actors(dashboard, class_name))
    probe = hc.completion_body(PROMPT, 8, stream=False)
    again_s, polls = hc.time_to_serve(url, probe, at, timeout_s=600)
    completed = [o for o in outcomes if o.kind == "completed"]
    return {
        **hc.count_kinds(outcomes),
        "killed": killed,
        "completed_with_other_text": sum(o.text != reference for o in completed),
        "serves_again_s": again_s and round(again_s, 1),
        "polls_until_served": hc.count_kinds(polls),
        "silent_examples": [o.summary() for o in outcomes if o.kind == "silent"][:3],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running service (default: start a local cluster and deploy)")
    p.add_argument("--dashboard", help="its Ray dashboard, for the actor kills")
    p.add_argument("--api-key", help="Bearer key, if the service requires one (admin scope for /v1/stats)")
    p.add_argument("--cancel", type=int, default=1000)
    p.add_argument("--cancel-concurrency", type=int, default=32)
    p.add_argument("--capacity", type=int, help="requests a replica runs at once (default: engine.max_num_seqs)")
    p.add_argument("--overload-factor", type=float, default=4.0)
    p.add_argument("--kill-streams", type=int, default=8)
    p.add_argument("--no-kills", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None
    config = hc.fault_app_config()
    cluster = None
    try:
        if args.url is None:
            cluster = LocalCluster(num_cpus=12)
            cluster.wait_ready()
            cluster.deploy(config, Path(tempfile.mkdtemp()) / "serve_config.yaml")
            url, dashboard = cluster.url, cluster.dashboard
            up_s = hc.wait_deployed(cluster, 600)
        else:
            url, dashboard = args.url.rstrip("/"), args.dashboard
            up_s = 0.0
        reference = hc.request(url, hc.completion_body(PROMPT, 40), headers=headers).text
        capacity = args.capacity or config["applications"][0]["args"]["engine"]["max_num_seqs"]
        report: dict = {"url": url, "serves_after_s": round(up_s, 1)}
        report["cancel"] = run_cancel(url, args.cancel, args.cancel_concurrency, headers)
        report["overload"] = run_overload(url, capacity, args.overload_factor, headers)
        if not args.no_kills and dashboard is not None:
            report["kills"] = {
                victim: run_kill(url, dashboard, victim, args.kill_streams, reference, headers) for victim in hc.VICTIMS
            }
    finally:
        if cluster is not None:
            cluster.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
