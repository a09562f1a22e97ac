"""Model loading: a Hugging Face folder (config.json, safetensors, tokenizer) or a GGUF file.

A GGUF is dequantized once by transformers and cached as a plain Hugging Face folder, so later loads (the
engine's, and the baseline's in benchmarks) read safetensors in about a second instead of re-dequantizing.
Weights are read tensor by tensor with `safe_open`, so a tensor-parallel rank can take only its slice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from model.default_model import default_model_path

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GraniteForCausalLM",
}


class ModelLoadError(ValueError):
    """A model path that cannot be served: missing, unreadable or an unsupported architecture."""


@dataclass(frozen=True)
class ModelArch:
    """The shape of a Llama-family decoder, read from config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int
    tie_word_embeddings: bool
    qkv_bias: bool
    # Granite's scalar multipliers (1.0 for the other architectures).
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0

    @property
    def attn_scale(self) -> float:
        return self.attention_multiplier if self.attention_multiplier is not None else self.head_dim**-0.5


def cache_dir() -> Path:
    return Path(os.environ.get("SPECSERVE_CACHE", Path.home() / ".cache" / "specserve"))


def model_source(model: str | None) -> Path:
    """The Hugging Face folder or the .gguf file that `model` names (None = the default model)."""
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path not found: {path}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelLoadError(f"{path} has no config.json and not exactly one .gguf file")
        path = ggufs[0]
    if path.suffix != ".gguf":
        raise ModelLoadError(f"not a model folder or .gguf file: {path}")
    return path


def resolve_model(model: str | None) -> Path:
    """The Hugging Face folder to load `model` from (None = the default model), converting a GGUF once."""
    path = model_source(model)
    return path if path.is_dir() else _gguf_to_folder(path)


@functools.lru_cache(maxsize=16)
def _content_key(path: Path, size: int, mtime_ns: int) -> str:  # noqa: ARG001 - size and mtime key the cache
    """A file's contents as a short hash (about 0.1 s for the default model's 98 MB, once per process)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def _gguf_to_folder(gguf: Path) -> Path:
    """The GGUF converted to a Hugging Face folder in the cache, once per distinct file content: the same model
    installed in several environments (each its own copy of the file) shares one folder."""
    stat = gguf.stat()
    out = cache_dir() / f"{gguf.stem}-{_content_key(gguf.resolve(), stat.st_size, stat.st_mtime_ns)}"
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a usable GGUF"
        raise ModelLoadError(f"cannot read GGUF {gguf}: {e}") from e
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    if out.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out


def load_arch(folder: Path) -> ModelArch:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {e}") from e
    arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"unsupported architecture {arch}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    heads = cfg["num_attention_heads"]
    return ModelArch(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_model_len=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
        embedding_multiplier=cfg.get("embedding_multiplier", 1.0),
        residual_multiplier=cfg.get("residual_multiplier", 1.0),
        attention_multiplier=cfg.get("attention_multiplier"),
        logits_scaling=cfg.get("logits_scaling", 1.0),
    )


def rope_cos_sin(folder: Path, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim] using transformers' RoPE parameterisations (default, llama3, yarn...)."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = LlamaRotaryEmbedding(AutoConfig.from_pretrained(str(folder)))
    pos = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(pos, rope.inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * rope.attention_scaling, emb.sin() * rope.attention_scaling


def iter_weights(folder: Path) -> Iterator[tuple[str, object]]:
    """(name, lazy safetensors slice) pairs; `slice[...]` or `slice[a:b]` reads only what is asked for."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {folder}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_slice(name)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def eos_token_ids(folder: Path, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's, plus any listed in generation_config.json."""
    ids = {tokenizer.eos_token_id} - {None}
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids
