"""A throwaway single-machine Ray cluster driven the way users drive one: `ray start --head`, then the `serve`
CLI and the dashboard's REST API. For the end-to-end tests and the serving benchmark.

Token auth is off (`RAY_AUTH_MODE=disabled`): every port is bound to 127.0.0.1, see cluster/README.md.
`stop()` ends exactly what `start` began (`ray start --block` takes its processes down on SIGTERM), never
other Ray clusters on the host.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

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


class LocalCluster:
    def __init__(self, num_cpus: int, app_name: str = "specserve"):
        self.app_name = app_name
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        self.gcs_port, self.dash_port, self.http_port = free_port(), free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.head = subprocess.Popen(
            [BIN / "ray", "start", "--head", "--block", f"--num-cpus={num_cpus}", f"--port={self.gcs_port}"]
            + [f"--dashboard-port={self.dash_port}", "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
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
        from ray.util.state import list_actors

        return list_actors(address=self.dashboard, filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])

    def kill(self, class_name: str) -> int:
        """SIGKILL every live actor of the class (what a crash or an OOM kill looks like); how many."""
        found = self.actors(class_name)
        for actor in found:
            os.kill(actor.pid, signal.SIGKILL)
        return len(found)

    def stop(self) -> None:
        try:
            self.serve("shutdown", "-y", timeout=60)
        except Exception:  # noqa: BLE001 - the head goes down below anyway
            pass
        self.head.send_signal(signal.SIGTERM)
        try:
            self.head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.head.kill()
