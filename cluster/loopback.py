"""A Ray cluster on one machine with every port on 127.0.0.1, for clusters that run without token auth (the
test cluster) and as a second fence for the private cluster of `specserve serve`.

Ray's servers listen on loopback only when the node's IP is exactly 127.0.0.1, and Ray replaces a loopback
`--node-ip-address`, `--address` or `_node_ip_address` by the host's address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its single-machine mode), which must be in the environment before ray is
imported. That mode also refuses `ray start --address` (a second node): `RAY_JOIN` starts one with the
loopback address kept as given.

One port escapes: Ray Serve 2.60 binds each replica's inter-deployment gRPC server to [::] whatever the node's
IP (ray/serve/_private/replica.py). With token auth on, that server checks the token like every other.
"""

from __future__ import annotations

import sys

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
NODE_IP = "127.0.0.1"
RAY_JOIN = [
    sys.executable,
    "-c",
    "import ray._private.ray_constants as c, ray._private.services as s; c.ENABLE_RAY_CLUSTER = True; "
    "s.resolve_ip_for_localhost = lambda host: host; from ray.scripts.scripts import main; main()",
]

LOOPBACK_IPS = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def listening(root_pid: int) -> list[tuple[str, int, str]]:
    """(ip, port, process name) of every listening TCP socket of a process and its descendants."""
    import psutil

    root = psutil.Process(root_pid)
    names = {p.pid: p.name() for p in [root, *root.children(recursive=True)]}
    return [
        (c.laddr.ip, c.laddr.port, names[c.pid])
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in names
    ]
