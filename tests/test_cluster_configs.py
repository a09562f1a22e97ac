"""The shipped cluster configs: Ray token auth and API keys on, the proxy's stream guard set on every node,
and the cluster's Serve config the same application as the RayService's."""

from __future__ import annotations

from pathlib import Path

import yaml

from cluster.local_cluster import REPO
from deployments.app_config import load_app_config
from deployments.proxy_guard import ENV_VAR, IMPORT_PATH

CLUSTER = REPO / "cluster"


def rayservice() -> dict:
    return yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())


def containers(manifest: dict) -> list[dict]:
    spec = manifest["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_cluster_serve_config_is_the_rayservice_application_with_auth_on():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    embedded = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    assert config["applications"] == embedded["applications"]
    auth = load_app_config(config["applications"][0]["args"]).ingress.auth
    assert auth.enabled and auth.keys_file


def test_rayservice_turns_ray_token_auth_on_and_mounts_the_keys():
    manifest = rayservice()
    assert manifest["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    args = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]
    mount_dir = str(Path(load_app_config(args).ingress.auth.keys_file).parent)
    for c in containers(manifest):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("RAY_AUTH_MODE") in (None, "token")  # never disabled
        assert env[ENV_VAR] == IMPORT_PATH
        assert any(m["mountPath"] == mount_dir for m in c["volumeMounts"])


def test_ray_up_cluster_starts_every_node_with_token_auth_and_the_guard():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    starts = [cmd for key in ("head_start_ray_commands", "worker_start_ray_commands") for cmd in config[key]]
    starts = [cmd for cmd in starts if "ray start" in cmd]
    assert len(starts) == 2
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd and f"{ENV_VAR}={IMPORT_PATH}" in cmd
    assert "/home/ray/.specserve/api_keys" in config["file_mounts"]


def test_image_sets_the_guard():
    assert f"ENV {ENV_VAR}={IMPORT_PATH}" in (CLUSTER / "Dockerfile").read_text()
