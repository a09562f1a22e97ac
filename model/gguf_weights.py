"""A GGUF's quantized linear weights as they are stored (`model.quant.PackedWeight`), under the checkpoint
names of the Hugging Face folder the loader converts it to.

Only the matrices of the linear layers and the embedding / LM head are read here; everything else (norms,
biases, the embedding rows looked up by token) comes from the converted folder as before. Tensors of a type
without a packed kernel (F32, F16, the K-quants) are left out, so their layers run on the float32 weights the
loader dequantized. llama.cpp stores the q and k projections of "llama" models with their rows permuted for its
interleaved RoPE; they are permuted back exactly as transformers does when it dequantizes, so a packed matrix
holds the same rows as the converted checkpoint.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from model.loader import ModelArch, ModelLoadError
from model.quant import BLOCK_BYTES, PackedWeight

log = logging.getLogger(__name__)

LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    """The converted checkpoint's name of a GGUF matrix, None for tensors that are not matrices packed here."""
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    return None


def _unpermute_rows(data: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (transformers' reverse_permute_weights, on whole packed rows)."""
    dim = data.shape[0] // n_head // 2
    return data.reshape(n_head, dim, 2, data.shape[1]).swapaxes(2, 1).reshape(data.shape)


def packed_types(gguf: Path) -> Counter[str]:
    """How many matrices of each GGML type the file holds, by type name (e.g. {"Q4_1": 210, "Q8_0": 1})."""
    from gguf import GGUFReader

    return Counter(t.tensor_type.name for t in GGUFReader(str(gguf)).tensors if hf_name(t.name) is not None)


def is_quantized(gguf: Path) -> bool:
    """Whether any of the file's linear matrices has a type the packed kernels run."""
    from gguf import GGMLQuantizationType

    return any(GGMLQuantizationType[name] in BLOCK_BYTES for name in packed_types(gguf))


def read_packed(gguf: Path, arch: ModelArch, num_layers: int | None = None) -> dict[str, PackedWeight]:
    """The file's packable matrices by converted checkpoint name (layers past `num_layers` skipped)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf))
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a usable GGUF"
        raise ModelLoadError(f"cannot read GGUF {gguf}: {e}") from e
    field = reader.fields.get("general.architecture")
    llama = field is not None and bytes(field.parts[field.data[0]]).decode() == "llama"
    out: dict[str, PackedWeight] = {}
    left: Counter[str] = Counter()
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        if name.startswith("model.layers.") and num_layers is not None and int(name.split(".")[2]) >= num_layers:
            continue
        qtype = int(t.tensor_type)
        if qtype not in BLOCK_BYTES:
            left[t.tensor_type.name] += 1
            continue
        data = np.asarray(t.data)
        in_features, out_features = (int(n) for n in t.shape[:2])
        if llama and ".q_proj." in name:
            data = _unpermute_rows(data, arch.num_heads)
        elif llama and ".k_proj." in name:
            data = _unpermute_rows(data, arch.num_kv_heads)
        out[name] = PackedWeight(qtype, torch.from_numpy(np.array(data, copy=True)), out_features, in_features)
    if left:
        log.info("%s: %s matrices stay float32 (no packed kernel for their type)", gguf.name, dict(left))
    return out
