"""The Serve application's arguments (`args:` in serve_config.yaml), validated before anything starts.

Every block forbids unknown keys and the engine block is the engine's own EngineConfig, so a typo anywhere
fails the deploy with one line naming the key path instead of being ignored. Autoscaling must state its
`target_ongoing_requests`: Serve's default (2) is far from right for an engine that batches dozens of
sequences, and a silent default would decide the replica count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from model.config import EngineConfig
from sampling.params import describe_validation_error
from speculator.adaptation import AdaptationConfig

DEFAULT_SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ActorResources(_Strict):
    """Ray resources of one actor (a tensor-parallel shard, or the draft worker)."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)


class AutoscalingSettings(_Strict):
    """The subset of Serve's autoscaling_config this app exposes; passed through unchanged."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    look_back_period_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class ReplicaAdmissionSettings(_Strict):
    """A replica's own admission check (deployments/admission.py): 503 + Retry-After beyond these."""

    # Requests handed to the engine that it cannot run yet (no batch slot or KV); beyond: 503.
    max_waiting: int = Field(default=16, ge=0)
    # While the engine runs something, a prompt is refused if fewer blocks than this share would stay free.
    min_free_kv_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    retry_after_s: int = Field(default=1, ge=1)


class TargetSettings(_Strict):
    """The engine deployment: how many replicas (fixed or autoscaled) and what each actor gets."""

    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling_config: AutoscalingSettings | None = None
    max_ongoing_requests: int = Field(default=64, ge=1)
    # Requests waiting in the handles beyond this get 503 (overloaded) instead of queueing without bound.
    max_queued_requests: int = Field(default=64, ge=-1)
    admission: ReplicaAdmissionSettings = Field(default_factory=ReplicaAdmissionSettings)
    shard_resources: ActorResources = Field(default_factory=ActorResources)
    draft_resources: ActorResources = Field(default_factory=ActorResources)
    # The KV block manager in its own actor (one call per step); False keeps it inside the replica.
    block_manager_actor: bool = True
    # How a replica's placement group (replica, shards, draft worker) is laid over nodes; None: STRICT_PACK on
    # CPU (one node, shards talk over loopback), PACK with GPUs. SPREAD/PACK let lost bundles move to another
    # node, so a replica survives the loss of the node that held some of its actors.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK"] | None = None

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> TargetSettings:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give either num_replicas or autoscaling_config, not both")
        return self

    def replica_options(self) -> dict[str, Any]:
        """Deployment options for `.options(...)`: a fixed count, or the autoscaling config (1 replica if
        neither is given)."""
        options: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests}
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config.model_dump()
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


class CompletionCacheSettings(_Strict):
    enabled: bool = True
    max_entries: int = Field(default=4096, ge=1)
    max_bytes: int = Field(default=64 << 20, ge=1)
    admit_after: int = Field(default=2, ge=1, le=255)
    # Entries are scoped per API key and `user`, so that a replay never tells one caller what another asked;
    # true shares them among all callers (a public deployment, where that reveals nothing).
    share_across_keys: bool = False
    # A cache call slower than this (the actor restarting, say) counts as a miss / a dropped offer.
    timeout_s: float = Field(default=0.5, gt=0)


class PrefixAffinitySettings(_Strict):
    """The request router between ingress replicas and engine replicas (request_router.py)."""

    enabled: bool = True
    # "specserve": request_router.py; "ray": Ray Serve LLM's PrefixCacheAffinityRouter (ray_prefix_router.py).
    router: Literal["specserve", "ray"] = "specserve"
    imbalance_threshold: int = Field(default=4, ge=0)
    stats_period_s: float = Field(default=2.0, gt=0)


class IngressAdmissionSettings(_Strict):
    """Completions a ingress replica answers at once (streams count until their last byte); beyond: 429."""

    max_in_flight: int = Field(default=192, ge=1)
    retry_after_s: int = Field(default=1, ge=1)


class AuthSettings(_Strict):
    """API keys (deployments/auth.py): from the environment variable `keys_env` and/or the file `keys_file`
    (a mounted Kubernetes or Ray secret). Off only for the local quick start."""

    enabled: bool = False
    keys_env: str | None = Field(default="SPECSERVE_API_KEYS", min_length=1)
    keys_file: str | None = Field(default=None, min_length=1)


class IngressSettings(_Strict):
    """The OpenAI-facing ingress deployment."""

    num_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=256, ge=1)
    # Request bodies beyond this get 413 (before they are read, when Content-Length says so).
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    # A stream whose replica died is resumed on a live replica if one answers within this time; else it ends
    # with an error event (a non-streaming request: 503 + Retry-After).
    resume_timeout_s: float = Field(default=60.0, ge=0)
    admission: IngressAdmissionSettings = Field(default_factory=IngressAdmissionSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    completion_cache: CompletionCacheSettings = Field(default_factory=CompletionCacheSettings)
    prefix_affinity: PrefixAffinitySettings = Field(default_factory=PrefixAffinitySettings)

    @field_validator("admission")
    @classmethod
    def _refusals_can_be_answered(cls, v: IngressAdmissionSettings, info: ValidationInfo) -> IngressAdmissionSettings:
        ongoing = info.data.get("max_ongoing_requests")
        if ongoing is not None and v.max_in_flight >= ongoing:
            raise ValueError(
                f"max_in_flight ({v.max_in_flight}) must be < max_ongoing_requests ({ongoing}), or requests "
                "beyond it queue before they can be refused"
            )
        return v


class DraftWorkerSettings(_Strict):
    """Run the model-backed drafters (a draft model, a learned one; under speculator auto the plan's and the
    adaptive loop's) in their own actor (with `target.draft_resources`) instead of inside the engine."""

    enabled: bool = False


class AppConfig(_Strict):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    served_model_name: str | None = Field(default=None, min_length=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    target: TargetSettings = Field(default_factory=TargetSettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    draft_worker: DraftWorkerSettings = Field(default_factory=DraftWorkerSettings)
    adaptation: AdaptationConfig = Field(default_factory=AdaptationConfig)

    @model_validator(mode="after")
    def _consistent(self) -> AppConfig:
        if self.served_model_name is None:
            self.served_model_name = served_name_for(self.engine.model)
            if self.engine.quantization == "int8":  # another model than the float one, named so
                self.served_model_name += "-int8"
        if self.draft_worker.enabled and self.engine.speculator not in ("draft", "mlp", "eagle", "auto"):
            raise ValueError("draft_worker.enabled: needs engine.speculator 'draft', 'mlp', 'eagle' or 'auto'")
        if self.adaptation.enabled and self.engine.speculator != "auto":
            raise ValueError("adaptation.enabled: needs engine.speculator 'auto'")
        if self.engine.device.startswith("cuda") and self.target.shard_resources.num_gpus <= 0:
            raise ValueError("target.shard_resources.num_gpus: must be > 0 when engine.device is cuda")
        return self


def served_name_for(model: str | None) -> str:
    """The model id clients use: the file or folder name (without .gguf); the default model's known name."""
    if model is None:
        return DEFAULT_SERVED_MODEL_NAME
    path = Path(model.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name


def load_app_config(args: dict[str, Any] | None) -> AppConfig:
    """Validate the app builder's args; ValueError with a one-line message naming the key path if bad."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ValueError(f"application args must be a mapping, got {type(args).__name__}")
    try:
        return AppConfig.model_validate(args)
    except ValidationError as e:
        raise ValueError(describe_validation_error(e, unknown="unknown key")) from None
