"""A throwaway single-machine Ray cluster driven the way users drive one: `ray start --head`, then the `serve`
CLI and the dashboard's REST API. For the end-to-end tests and the serving benchmark.

Token auth is off (`RAY_AUTH_MODE=disabled`), so every port listens on 127.0.0.1 only (`cluster/loopback.py`;
except the Serve replicas' inter-deployment gRPC ports, which Ray binds to [::]). The Serve proxies load
`deployments.proxy_guard` (streams cut by a dying ingress still end properly).
`stop()` ends exactly what `start` began (`ray start --block` takes its processes down on SIGTERM), never
other Ray clusters on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from cluster.loopback import LOOPBACK_ENV, NODE_IP, RAY_JOIN
from deployments.proxy_guard import proxy_env

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ok(url: str, timeout_s: float, alive=lambda: True) -> None:
    """Poll `url` until it answers 200; TimeoutError after `timeout_s`, RuntimeError once `alive()` is False."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not alive():
            raise RuntimeError(f"gave up on {url}: the process serving it exited")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@contextlib.contextmanager
def served_app(args: dict[str, Any]) -> Iterator[str]:
    """The app of `args` served by Serve on the Ray instance this process is connected to; yields its URL once
    /health answers."""
    from ray import serve

    from deployments.app import build_app

    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="specserve", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_until_ok(f"{url}/health", 300)
        yield url
    finally:
        serve.shutdown()


@contextlib.contextmanager
def local_app(args: dict[str, Any], num_cpus: int = 4) -> Iterator[str]:
    """The app of `args` on a private in-process Ray instance (never a running cluster); yields its URL."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        with served_app(args) as url:
            yield url
    finally:
        ray.shutdown()


def live_actors(dashboard: str, class_name: str) -> list[Any]:
    from ray.util.state import list_actors

    return list_actors(address=dashboard, filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])


def kill_actors(dashboard: str, class_name: str) -> int:
    """SIGKILL every live actor of the class on this host (what a crash or an OOM kill looks like); how many."""
    found = live_actors(dashboard, class_name)
    for actor in found:
        os.kill(actor.pid, signal.SIGKILL)
    return len(found)


class LocalCluster:
    def __init__(self, num_cpus: int, app_name: str = "specserve"):
        self.app_name = app_name
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", **LOOPBACK_ENV, **proxy_env()}
        self.gcs_port, self.dash_port, self.http_port = free_port(), free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.head = subprocess.Popen(
            [BIN / "ray", "start", "--head", "--block", f"--num-cpus={num_cpus}", f"--port={self.gcs_port}"]
            + [f"--dashboard-port={self.dash_port}", "--dashboard-host=127.0.0.1", "--disable-usage-stats"]
            + [f"--node-ip-address={NODE_IP}", f"--ray-client-server-port={free_port()}"],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout_s: float = 120) -> None:
        wait_until_ok(f"{self.dashboard}/api/version", timeout_s, alive=lambda: self.head.poll() is None)

    def serve(self, *args: str, timeout: float = 120) -> str:
        """Run the `serve` CLI against this cluster; its stdout, or RuntimeError with its stderr."""
        out = subprocess.run(
            [BIN / "serve", *args, "-a", self.dashboard],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise RuntimeError(f"serve {' '.join(args)} failed: {out.stderr[-2000:]}")
        return out.stdout

    def deploy(self, config: dict[str, Any], path: Path) -> None:
        """`serve deploy` of a serve_config.yaml-shaped dict, with HTTP on this cluster's port."""
        config = {**config, "http_options": {**config.get("http_options", {}), "port": self.http_port}}
        path.write_text(yaml.safe_dump(config))
        self.serve("deploy", str(path))

    def status(self) -> dict[str, Any]:
        """The app's entry of what `serve status` reads (the dashboard's REST API, without a CLI start)."""
        details = httpx.get(f"{self.dashboard}/api/serve/applications/", timeout=60).json()
        return details["applications"].get(self.app_name, {})

    def running_replicas(self, deployment: str = "LLMServer") -> int:
        replicas = self.status().get("deployments", {}).get(deployment, {}).get("replicas", [])
        return sum(r["state"] == "RUNNING" for r in replicas)

    def actors(self, class_name: str) -> list[Any]:
        return live_actors(self.dashboard, class_name)

    def kill(self, class_name: str) -> int:
        return kill_actors(self.dashboard, class_name)

    def add_worker_node(self, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        """A second Ray node on this machine (`ray start --address ...`), with its own CPUs and custom resources;
        returns once the cluster counts it alive. Its agents get free ports so they do not collide with the
        head's. One worker node at a time."""
        if getattr(self, "worker", None) is not None:
            raise RuntimeError("a worker node is already running")
        ports = [f"--{name}={free_port()}" for name in self._WORKER_PORTS]
        ip = [a for a in map(str, self.head.args) if a.startswith("--node-ip-address")]
        self.worker_log = Path(tempfile.mkstemp(prefix="ray-worker-node-", suffix=".log")[1])  # why it stopped
        with self.worker_log.open("w") as log:
            self.worker = subprocess.Popen(
                [*RAY_JOIN, "start", "--block", f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}"]
                + [f"--resources={json.dumps(resources or {})}", "--disable-usage-stats", *ip, *ports],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.time() + 120
        while self.alive_nodes() < 2:
            if self.worker.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the worker node did not join (exit code {self.worker.poll()})")
            time.sleep(1)

    _WORKER_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")

    def alive_nodes(self) -> int:
        from ray.util.state import list_nodes

        return len(list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")]))

    def driver(self, code: str, timeout: float = 120) -> str:
        """Run a Python snippet as a Ray driver of this cluster (`ray` is imported and connected, always in the
        same namespace, so named objects one snippet makes the next finds); its stdout."""
        init = f"ray.init(address='127.0.0.1:{self.gcs_port}', namespace='local-cluster', log_to_driver=False)"
        script = f"import ray\n{init}\n{code}"
        out = subprocess.run(
            [sys.executable, "-c", script], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        if out.returncode != 0:
            raise RuntimeError(f"driver failed: {out.stderr[-2000:]}")
        return out.stdout

    def stop_worker_node(self, sig: int = signal.SIGTERM) -> None:
        """Stop the worker node (SIGTERM: `ray start --block` takes its raylet and workers down, as a node
        drained or shut down; SIGKILL to its whole process group: a node lost without notice)."""
        worker, self.worker = getattr(self, "worker", None), None
        if worker is None:
            return
        if sig == signal.SIGKILL:
            os.killpg(worker.pid, signal.SIGKILL)
        else:
            worker.send_signal(sig)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)

    def stop(self) -> None:
        self.stop_worker_node()
        try:
            self.serve("shutdown", "-y", timeout=60)
        except Exception:  # noqa: BLE001 - the head goes down below anyway
            pass
        self.head.send_signal(signal.SIGTERM)
        try:
            self.head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.head.kill()
