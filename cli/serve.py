"""`specserve serve [serve_config.yaml]`: the config's applications on a private local Ray cluster.

`serve run` connects to whatever cluster Ray's records name, so after an unclean stop it waits forever on a
cluster that no longer exists. This command starts its own cluster every time (`ray.init(address="local")`,
token auth on, Ray's ports on 127.0.0.1), deploys the config like `serve run` does (http_options and
applications from the file), prints the URL once the applications are RUNNING, and on SIGTERM or Ctrl-C
alike shuts Serve and the cluster down and exits 0. With `--address` it deploys onto an existing cluster
instead, after checking within seconds that something answers there.

The proxy gets `deployments.proxy_guard` (see there) through the environment, set before Ray starts so every
process of the cluster inherits it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cluster.loopback import LOOPBACK_ENV, NODE_IP
from deployments.proxy_guard import proxy_env

READY_POLL_S = 1.0
# The private cluster's environment, inherited by every process of it (the Serve proxy included): Ray's token
# auth, deliberately (a token is made in ~/.ray/auth_token if missing), and Ray's ports on 127.0.0.1.
PRIVATE_CLUSTER_ENV = {"RAY_AUTH_MODE": "token", **LOOPBACK_ENV, **proxy_env()}
CONNECT_TIMEOUT_S = 3.0


class ServeError(Exception):
    """A problem the user can fix; printed as one line."""


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM / SIGINT, wherever it is (even inside Ray's start-up)."""


def load_config(path: Path) -> Any:
    """The file as Ray's ServeDeploySchema, each application's args checked by its own builder (our
    `build_app` names a bad key), all before a cluster starts."""
    from pydantic import ValidationError
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ServeError(f"{path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ServeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    try:
        config = ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise ServeError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from e
    if not config.applications:
        raise ServeError(f"{path}: no applications")
    for app in config.applications:
        try:
            call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args or {})
        except (ValueError, TypeError, ImportError, AttributeError) as e:
            raise ServeError(f"{path}: application {app.name!r}: {str(e).splitlines()[0]}") from e
    return config


def check_address(address: str) -> str:
    """The GCS address `address` resolves to (Ray's own rules: RAY_ADDRESS, "auto", the record of the last
    `ray start`), if something accepts connections there; ServeError saying what to do otherwise."""
    from ray._common.network_utils import parse_address
    from ray._private.services import canonicalize_bootstrap_address

    try:
        resolved = canonicalize_bootstrap_address(address.split("://", 1)[-1])
    except (ConnectionError, ValueError) as e:
        raise ServeError(f"no Ray cluster found for --address {address} ({str(e).splitlines()[0]})") from e
    if resolved is None:
        raise ServeError(f"--address {address} names no cluster; leave --address out to start a private one")
    host, port = parse_address(resolved)
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ServeError(
            f"no Ray cluster answers at {resolved} ({e.strerror or e}); Ray's record of a stopped cluster may be "
            "stale: start one with `ray start --head`, or leave --address out to run on a private cluster"
        ) from e
    return resolved


def _app_urls(config: Any) -> list[str]:
    host = config.http_options.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return [f"http://{shown}:{config.http_options.port}{app.route_prefix or ''}" for app in config.applications]


def _wait_running(names: list[str], deadline: float) -> None:
    from ray import serve

    while True:
        apps = serve.status().applications
        states = {name: apps[name].status if name in apps else "NOT_STARTED" for name in names}
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            message = (apps[failed[0]].message or "").strip().splitlines()
            raise ServeError(f"application {failed[0]!r} failed to deploy: {message[-1] if message else 'no reason'}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.time() > deadline:
            raise ServeError(f"applications not RUNNING after the start timeout: {states}")
        time.sleep(READY_POLL_S)


def _on_signal(signum, frame) -> None:
    # Ignore repeats while shutting down: a second Ctrl-C must not cut the clean-up short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise _Stop


def _trap_signals() -> None:
    """SIGTERM behaves exactly as Ctrl-C. Set again after ray.init, which installs its own SIGTERM handler."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def serve_config(
    path: Path, address: str | None = None, num_cpus: int | None = None, start_timeout_s: float = 900
) -> int:
    """Run the config until SIGTERM / SIGINT; the exit code (0 after a signal). Call it before anything has
    imported ray: Ray reads the variables set here when it is imported."""
    private = address is None
    if private:
        os.environ.update(PRIVATE_CLUSTER_ENV)
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve._private.constants import SERVE_NAMESPACE

    config = load_config(path)
    names = [app.name for app in config.applications]
    _trap_signals()
    try:
        if private:
            ray.init(
                address="local",
                namespace=SERVE_NAMESPACE,
                num_cpus=num_cpus,
                dashboard_host="127.0.0.1",
                _node_ip_address=NODE_IP,
            )
        else:
            ray.init(address=check_address(address), namespace=SERVE_NAMESPACE)
        _trap_signals()
        client = serve_api.serve_start(
            http_options=config.http_options.model_dump(),
            grpc_options=config.grpc_options.model_dump(),
            proxy_location=config.proxy_location,
            controller_options=config.controller_options,
        )
        client.deploy_apps(config, _blocking=False)
        _wait_running(names, time.time() + start_timeout_s)
        print(f"specserve: serving {', '.join(_app_urls(config))} (Ctrl-C or SIGTERM stops)", flush=True)
        while True:
            time.sleep(3600)
    except _Stop:
        print("specserve: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                if private:
                    serve.shutdown()
                else:
                    for name in names:  # a shared cluster keeps its other applications
                        serve.delete(name)
            ray.shutdown()
