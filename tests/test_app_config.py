"""App config validation, and the deploy files (serve_config.yaml, cluster/*.yaml) against it and each other."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from deployments.app_config import DEFAULT_SERVED_MODEL_NAME, AppConfig, load_app_config, served_name_for

REPO = Path(__file__).resolve().parents[1]
AUTOSCALE = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8}}


def error_of(args) -> str:
    with pytest.raises(ValueError) as info:
        load_app_config(args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults():
    cfg = load_app_config({})
    assert isinstance(cfg, AppConfig)
    assert cfg.served_model_name == DEFAULT_SERVED_MODEL_NAME
    assert cfg.tensor_parallel_size == 1
    assert cfg.target.replica_options() == {"max_ongoing_requests": 64, "num_replicas": 1}
    assert cfg.ingress.completion_cache.admit_after == 2
    assert load_app_config(None) == cfg


@pytest.mark.parametrize(
    "args, expected",
    [
        ({"enigne": {}}, "enigne: unknown key"),
        ({"engine": {"modle": "x"}}, "engine.modle: unknown key"),
        ({"target": {"replicas": 2}}, "target.replicas: unknown key"),
        ({"target": {"shard_resources": {"gpus": 1}}}, "target.shard_resources.gpus: unknown key"),
        ({"ingress": {"completion_cache": {"size": 1}}}, "ingress.completion_cache.size: unknown key"),
        ({"draft_worker": {"enable": True}}, "draft_worker.enable: unknown key"),
    ],
)
def test_unknown_keys_are_named_with_their_path(args, expected):
    assert error_of(args) == expected


def test_target_ongoing_requests_must_be_given_explicitly():
    args = {"target": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}}
    assert error_of(args) == "target.autoscaling_config.target_ongoing_requests: field required"


@pytest.mark.parametrize(
    "args, path",
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"tensor_parallel_size": "two"}, "tensor_parallel_size"),
        ({"engine": {"block_size": 0}}, "engine.block_size"),
        ({"engine": {"speculator": "medusa"}}, "engine.speculator"),
        ({"target": {"num_replicas": 0}}, "target.num_replicas"),
        ({"target": {"max_ongoing_requests": 0}}, "target.max_ongoing_requests"),
        ({"target": {"shard_resources": {"num_gpus": -1}}}, "target.shard_resources.num_gpus"),
        (
            {"target": {"autoscaling_config": {**AUTOSCALE["autoscaling_config"], "target_ongoing_requests": 0}}},
            "target.autoscaling_config.target_ongoing_requests",
        ),
        ({"ingress": {"num_replicas": 0}}, "ingress.num_replicas"),
        ({"ingress": {"completion_cache": {"admit_after": 0}}}, "ingress.completion_cache.admit_after"),
        ({"ingress": {"completion_cache": {"max_bytes": -5}}}, "ingress.completion_cache.max_bytes"),
        ({"served_model_name": ""}, "served_model_name"),
        ({"ingress": {"max_request_bytes": 10}}, "ingress.max_request_bytes"),
        ({"ingress": {"admission": {"max_in_flight": 0}}}, "ingress.admission.max_in_flight"),
        ({"ingress": {"admission": {"max_in_flight": 300}}}, "ingress.admission"),
        ({"ingress": {"auth": {"enabled": "maybe"}}}, "ingress.auth.enabled"),
        ({"ingress": {"completion_cache": {"timeout_s": 0}}}, "ingress.completion_cache.timeout_s"),
        ({"target": {"admission": {"min_free_kv_fraction": 1.0}}}, "target.admission.min_free_kv_fraction"),
    ],
)
def test_bad_values_name_the_key(args, path):
    assert error_of(args).startswith(path + ": ")


def test_cross_field_checks_name_their_keys():
    both = {"target": {"num_replicas": 2, **AUTOSCALE}}
    assert error_of(both).startswith("target: ") and "not both" in error_of(both)
    inverted = {"target": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2, "target_ongoing_requests": 4}}}
    assert error_of(inverted).startswith("target.autoscaling_config: min_replicas")
    assert error_of({"draft_worker": {"enabled": True}}).startswith("draft_worker.enabled: ")
    assert error_of({"engine": {"device": "cuda"}}).startswith("target.shard_resources.num_gpus: ")
    assert error_of({"adaptation": {"enabled": True}}).startswith("adaptation.enabled: needs engine.speculator 'auto'")
    ngram_in_worker = {"engine": {"speculator": "ngram"}, "draft_worker": {"enabled": True}}
    assert error_of(ngram_in_worker).startswith("draft_worker.enabled: ")
    assert error_of({"adaptation": {"min_records": 2}}).startswith("adaptation.min_records")
    assert error_of({"engine": {"ngram_min": 3, "ngram_max": 2}}).startswith("engine: ngram_min")
    assert error_of([1, 2]).startswith("application args must be a mapping")


def test_valid_combinations():
    cfg = load_app_config({"target": AUTOSCALE})
    assert cfg.target.replica_options()["autoscaling_config"]["target_ongoing_requests"] == 8
    assert "num_replicas" not in cfg.target.replica_options()
    cfg = load_app_config({"engine": {"speculator": "draft"}, "draft_worker": {"enabled": True}})
    assert cfg.engine.draft_num_layers == 4  # EngineConfig's own defaulting still applies
    # the adaptive loop with its drafters in the replica's draft worker
    cfg = load_app_config(
        {"engine": {"speculator": "auto"}, "draft_worker": {"enabled": True}, "adaptation": {"enabled": True}}
    )
    assert cfg.draft_worker.enabled and cfg.adaptation.enabled
    cfg = load_app_config({"engine": {"device": "cuda"}, "target": {"shard_resources": {"num_gpus": 1}}})
    assert cfg.target.shard_resources.num_gpus == 1


@pytest.mark.parametrize(
    "model, name",
    [(None, DEFAULT_SERVED_MODEL_NAME), ("/models/Qwen2.5-0.5B-Instruct/", "Qwen2.5-0.5B-Instruct"), ("a/b.gguf", "b")],
)
def test_served_model_name_is_derived_unless_given(model, name):
    assert served_name_for(model) == name
    assert load_app_config({"engine": {"model": model}}).served_model_name == name
    assert load_app_config({"engine": {"model": model}, "served_model_name": "mine"}).served_model_name == "mine"


# ---- deploy files --------------------------------------------------------------------------------------------


def serve_config() -> dict:
    return yaml.safe_load((REPO / "serve_config.yaml").read_text())


def test_serve_config_app_args_pass_load_app_config():
    config = serve_config()
    (app,) = config["applications"]
    assert app["name"] == "specserve" and app["route_prefix"] == "/"
    assert app["import_path"] == "deployments.app:build_app"
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    cfg = load_app_config(app["args"])
    assert cfg.engine.model is None and cfg.engine.speculator == "ngram" and cfg.engine.num_speculative_tokens == 4
    assert cfg.tensor_parallel_size == 1
    auto = cfg.target.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (1, 2)
    assert "target_ongoing_requests" in app["args"]["target"]["autoscaling_config"]  # explicit, not defaulted


def without_auth(applications: list[dict]) -> list[dict]:
    applications = copy.deepcopy(applications)
    for app in applications:
        app["args"]["ingress"].pop("auth", None)
    return applications


def test_serve_config_states_every_limit_explicitly():
    """The limits that shed load and bound latency are in the file, not left to defaults."""
    (app,) = serve_config()["applications"]
    ingress, target = app["args"]["ingress"], app["args"]["target"]
    for key in ("max_request_bytes", "resume_timeout_s", "admission", "auth"):
        assert key in ingress, key
    assert {"max_queued_requests", "admission"} <= set(target)
    cfg = load_app_config(app["args"])
    assert cfg.ingress.admission.max_in_flight < cfg.ingress.max_ongoing_requests
    assert cfg.ingress.completion_cache.share_across_keys is False


def test_serve_config_is_a_valid_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config())
    assert schema.applications[0].import_path == "deployments.app:build_app"


def test_rayservice_holds_the_same_application_as_serve_config():
    manifest = yaml.safe_load((REPO / "cluster" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    # the same app, except that a cluster turns API keys on (the local quick start has them off)
    assert without_auth(embedded["applications"]) == without_auth(serve_config()["applications"])
    auth = load_app_config(embedded["applications"][0]["args"]).ingress.auth
    assert auth.enabled and (auth.keys_env or auth.keys_file)
    assert load_app_config(serve_config()["applications"][0]["args"]).ingress.auth.enabled is False
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = [c["resources"]["limits"] for w in workers for c in w["template"]["spec"]["containers"]]
    assert any(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits)


def test_ray_cluster_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in types.values())
    assert any("pip install -q -e" in cmd for cmd in config["setup_commands"])
