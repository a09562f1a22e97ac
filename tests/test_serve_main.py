"""`specserve serve`: one-line errors before anything starts, a dead --address detected at once, and the real
command on its private cluster: serves, stops on SIGTERM with exit code 0 leaving none of its processes, and
serves again when started again (nothing left behind blocks a restart)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from cluster import hostile_client as hc
from cluster.local_cluster import REPO, free_port
from cluster.loopback import LOOPBACK_IPS, listening
from deployments.proxy_guard import proxy_env

SPECSERVE = [sys.executable, "-m", "cli.main", "serve"]
START_S = 600  # bound on a start to RUNNING (model load) on a busy 2-core machine
STOP_S = 60  # bound on SIGTERM to exit


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SPECSERVE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("specserve: error:"), out.stderr[-2000:]
    return lines[0]


def test_bad_config_is_one_line_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {"applications": [{"name": "x", "import_path": "deployments.app:build_app", "args": {"enigne": {}}}]}
        )
    )
    assert "enigne: unknown key" in one_error_line(run_cli(str(bad)))
    assert "No such file" in one_error_line(run_cli(str(tmp_path / "missing.yaml")))


def test_dead_address_is_detected_at_once():
    """What Ray's record of a cluster that stopped uncleanly points at: nothing listens there any more."""
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    start = time.time()
    line = one_error_line(run_cli("serve_config.yaml", "--address", "auto", env=env, timeout=60))
    assert time.time() - start < 30
    assert "no Ray cluster answers" in line and "ray start --head" in line


def small_config(port: int) -> dict:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    args = config["applications"][0]["args"]
    args["engine"].update(kv_cache_gib=0.1, max_model_len=512)
    target = args["target"]
    target.pop("autoscaling_config", None)
    target.update(num_replicas=1, block_manager_actor=False)
    args["ingress"]["completion_cache"]["enabled"] = False
    return config


class Served:
    """One `specserve serve` process in its own session, with its stdout lines collected."""

    def __init__(self, config: Path):
        self.proc = subprocess.Popen(
            [*SPECSERVE, str(config), "--num-cpus", "4"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("specserve: serving"):
                self.ready.set()
        self.ready.set()

    def tree(self) -> list[psutil.Process]:
        self.seen = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        return self.seen

    def kill_all(self) -> None:
        """Test clean-up only (after a failure): whatever of its processes is left."""
        for p in getattr(self, "seen", []):
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_serve_stops_cleanly_on_sigterm_and_serves_again(tmp_path):
    port = free_port()
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(small_config(port)))
    url = f"http://127.0.0.1:{port}"
    for attempt in range(2):
        served = Served(config)
        try:
            assert served.ready.wait(START_S) and served.proc.poll() is None, "".join(served.lines)
            assert f"{url}/" in served.lines[-1]
            out = hc.request(url, hc.completion_body("def add(a, b):", 4))
            assert out.kind == "completed", out.summary()
            processes = served.tree()
            if attempt == 0:
                proxies = [p for p in processes if p.name().startswith("ray::ProxyActor")]
                assert proxies, [p.name() for p in processes]
                for key, value in proxy_env().items():  # the stream guard reaches the proxy
                    assert proxies[0].environ().get(key) == value
                exposed = [s for s in listening(served.proc.pid) if s[0] not in LOOPBACK_IPS]
                assert all(name.startswith("ray::ServeReplica") for _, _, name in exposed), exposed  # loopback.py
            served.proc.send_signal(signal.SIGTERM)
            assert served.proc.wait(timeout=STOP_S) == 0
            deadline = time.time() + STOP_S
            while alive(processes) and time.time() < deadline:
                time.sleep(1)
            assert not alive(processes), [(p.pid, p.name()) for p in alive(processes)]
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"{url}/v1/models", timeout=5)
        finally:
            served.kill_all()
