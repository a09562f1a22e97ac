"""Engine settings; unknown keys and bad values fail loudly, naming the key."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="HF folder or .gguf; None = SmolLM2-135M-Instruct")
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    attention_backend: Literal["auto", "torch", "cpu"] = Field(
        default="auto", description='paged attention: the C++ CPU kernel ("cpu"), PyTorch ("torch"), or auto'
    )
    cpu_kernels: bool = Field(
        default=True, description="on CPU, build and use the C++ kernels (in-place paged attention, small matmuls)"
    )
    weights: Literal["auto", "fp32", "packed"] = Field(
        default="auto",
        description="linear layers of a quantized GGUF (Q4_0, Q4_1, Q8_0) kept in their blocks and run by the C++ "
        'kernels ("packed", float32 on CPU only), or dequantized to float32 ("fp32"); auto = packed where it can',
    )
    quantization: Literal["none", "int8"] = Field(
        default="none",
        description="int8: the float weights quantized to int8 at load (Q8_0 blocks, run packed; CPU, float32). "
        "A different model than the float one: speculation is lossless relative to the int8 model",
    )
    block_size: int = Field(default=16, ge=1, le=1024)
    kv_cache_gib: float = Field(default=1.0, gt=0)
    enable_prefix_caching: bool = True
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=512, ge=16)
    max_model_len: int | None = Field(default=None, ge=16, description="None = the model's context length")
    speculator: Literal["none", "ngram", "suffix", "draft", "mlp", "eagle", "auto"] = Field(
        default="none",
        description="mlp/eagle: a learned drafter read from speculator_model; auto: per workload class, the drafter "
        "and k of `plan` (without a plan: ngram for every request)",
    )
    plan: str | None = Field(default=None, description="speculator auto: the plan `specserve profile` wrote")
    speculator_model: str | None = Field(
        default=None, description="the learned drafter's folder (`specserve distill` writes one); mlp/eagle only"
    )
    num_speculative_tokens: int = Field(default=4, ge=1, le=32)
    num_candidates: int = Field(
        default=1, ge=1, le=16, description="candidate paths verified per step as one token tree (1 = one chain)"
    )
    adaptive_k: bool = Field(default=True, description="per-sequence backoff of k when acceptance is poor")
    k_policy: Literal["auto", "cost", "backoff"] = Field(
        default="auto",
        description="adaptive k: the plain backoff on misses, or the cost model (the backoff's k capped at what pays "
        "for the step time by rows, the drafter's cost, acceptance and batch size; k = 0 included); auto = the cost "
        "model under speculator auto and the learned drafters (mlp, eagle: a proposal costs time), the backoff "
        "otherwise. The cost model's k depends on measured times, so a "
        "seeded sampled request is reproducible only with backoff",
    )
    ngram_min: int = Field(default=1, ge=1)
    ngram_max: int = Field(default=4, ge=1)
    draft_model: str | None = Field(default=None, description="draft folder or .gguf; None = the target's")
    draft_num_layers: int | None = Field(
        default=None, ge=1, description="keep only the first N layers of the draft (a layer-truncated copy)"
    )
    draft_kv_cache_gib: float = Field(default=0.25, gt=0)

    @property
    def k_policy_in_use(self) -> Literal["cost", "backoff"]:
        """The k policy `k_policy` names, auto resolved."""
        if self.k_policy == "auto":
            return "cost" if self.speculator in ("auto", "mlp", "eagle") else "backoff"
        return self.k_policy

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.weights == "packed" and (self.device != "cpu" or self.dtype != "float32" or not self.cpu_kernels):
            raise ValueError("weights: packed runs on device cpu with dtype float32 and cpu_kernels on")
        if self.quantization == "int8" and (
            self.weights == "packed" or self.device != "cpu" or self.dtype != "float32" or not self.cpu_kernels
        ):
            raise ValueError("quantization: int8 quantizes float weights on device cpu, float32, cpu_kernels on "
                             "(not with weights: packed)")  # fmt: skip
        if self.ngram_min > self.ngram_max:
            raise ValueError("ngram_min must be <= ngram_max")
        learned = self.speculator in ("mlp", "eagle")
        if learned and not self.speculator_model:
            raise ValueError(f"speculator_model: required for speculator '{self.speculator}' (a drafter folder)")
        if self.speculator_model and not learned:
            raise ValueError(f"speculator_model: only read by speculator 'mlp' or 'eagle', not '{self.speculator}'")
        if self.plan and self.speculator != "auto":
            raise ValueError(f"plan: only read by speculator 'auto', not '{self.speculator}'")
        if self.speculator == "draft" and self.draft_model is None and self.draft_num_layers is None:
            # The target itself is no draft: default to a layer-truncated copy of it.
            self.draft_num_layers = 4
        return self
