"""An EAGLE-style head (EAGLE-1, arXiv 2401.15077): one decoder layer of the target's architecture that predicts
the target's next final hidden state ("feature") from the current one and the token it produced.

Row t of the head reads fc([f_t ; E(x_{t+1})]) (Linear 2d -> d over the feature at t and the embedding of the token
that followed) at RoPE position t and outputs f^_{t+1}; the target's LM head on f^_{t+1} gives token t+2. Drafting
k tokens feeds the head's own f^ back in with the token it just picked. The embedding, the LM head and the RoPE
tables are the target's, frozen and never saved (`TargetParts`); with a `DraftVocab` the LM head is cut to its K
rows, so a token outside it is never proposed (the reserved "other" row has no use here: inputs are embedded by
the target's full table).

The features are the runner's hidden states after the final norm, so the LM head applies directly. The layer is a
plain torch Llama layer (RMSNorm, attention with RoPE and GQA, SiLU-gated MLP) rather than the paged
`model.decoder.DecoderLayer`: it trains with autograd over whole windows and keeps its own small contiguous KV.

For serving on CPU the proposer may run the head's matrices as int8 (`quantize_int8`: Q8_0 blocks through the
target's packed matmul kernel), reading a quarter of float32's bytes a draft step; training keeps float32.

A checkpoint folder holds config.json (model_type "specserve_eagle"), model.safetensors and draft_vocab.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from model.decoder import CausalLM, rotate
from model.loader import ModelArch
from model.quant import BLOCK, PackedWeight, quantize_q8_0
from speculator.draft_vocab import DraftVocab
from speculator.drafter_config import read_drafter_config

WEIGHTS_FILE = "model.safetensors"
IGNORE = -100


class EagleLoadError(ValueError):
    """A folder that is not an EAGLE head of this format, or one that does not fit the target."""


class EagleConfig(BaseModel):
    """The head's shape: the target's decoder-layer shape (config.json of the checkpoint folder)."""

    model_config = ConfigDict(extra="forbid")

    model_type: Literal["specserve_eagle"] = "specserve_eagle"
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=2)
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    attn_scale: float = Field(gt=0)
    qkv_bias: bool = False
    vocab_size: int = Field(ge=1, description="the target's vocabulary")
    draft_steps: int | None = Field(
        default=None, ge=1, description="the chain length it was trained to draft (the engine drafts no deeper)"
    )

    @classmethod
    def from_arch(cls, arch: ModelArch) -> EagleConfig:
        return cls(
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            num_heads=arch.num_heads,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            rms_norm_eps=arch.rms_norm_eps,
            attn_scale=arch.attn_scale,
            qkv_bias=arch.qkv_bias,
            vocab_size=arch.vocab_size,
        )


@dataclass
class TargetParts:
    """What the head borrows from the target, frozen: embedding [V, d], LM head [V, d], RoPE cos/sin [P, head_dim]
    and Granite's embedding and logits scalars."""

    embed: torch.Tensor
    lm_head: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0

    @classmethod
    def from_model(cls, model: CausalLM) -> TargetParts:
        """The parts of a loaded target (one rank: the head needs the whole vocabulary)."""
        if model.tp.world_size != 1:
            raise ValueError("an EAGLE head needs the target's whole embedding and LM head (tensor_parallel_size 1)")
        arch = model.arch
        return cls(
            model.embed.weight.detach()[: arch.vocab_size],
            model.lm_head.weight.detach()[: arch.vocab_size],
            model.cos,
            model.sin,
            arch.embedding_multiplier,
            arch.logits_scaling,
        )


class EagleLayer(nn.Module):
    """A Llama decoder layer with Hugging Face's parameter names; attention is supplied by the caller."""

    def __init__(self, c: EagleConfig):
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        self.input_layernorm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        self.q_proj = nn.Linear(d, c.num_heads * hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(d, c.num_kv_heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(d, c.num_kv_heads * hd, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * hd, d, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        self.gate_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, d, bias=False)


class EagleHead(nn.Module):
    def __init__(self, config: EagleConfig, draft_vocab: DraftVocab | None = None, target: TargetParts | None = None):
        super().__init__()
        if config.num_heads % config.num_kv_heads:
            raise ValueError(f"{config.num_heads} query heads do not form groups over {config.num_kv_heads} KV heads")
        if draft_vocab is not None and draft_vocab.target_vocab_size != config.vocab_size:
            raise ValueError(f"a draft vocabulary of another target ({draft_vocab.target_vocab_size} tokens)")
        self.config = config
        self.draft_vocab = draft_vocab
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=True)
        self.layer = EagleLayer(config)
        self.target: TargetParts | None = None  # not a module or buffer: never trained, never saved
        self._lm_rows: torch.Tensor | None = None
        self._int8: dict[str, tuple[PackedWeight, torch.Tensor | None]] = {}  # name -> (blocks, bias): quantize_int8
        self._kernels = None
        if target is not None:
            self.attach(target)

    def attach(self, target: TargetParts) -> EagleHead:
        """Borrow the target's embedding, LM head (cut to the draft vocabulary) and RoPE tables."""
        c = self.config
        if target.embed.shape != (c.vocab_size, c.hidden_size) or target.lm_head.shape != target.embed.shape:
            raise EagleLoadError(
                f"the head wants a target of vocabulary {c.vocab_size} and width {c.hidden_size}, "
                f"got embedding {list(target.embed.shape)}"
            )
        if target.cos.shape[-1] != c.head_dim:
            raise EagleLoadError(f"the target's RoPE tables are for head_dim {target.cos.shape[-1]}, not {c.head_dim}")
        self.target = target
        rows = target.lm_head
        if self.draft_vocab is not None:
            rows = rows[self.draft_vocab.target_index(rows.device)]
        self._lm_rows = rows
        return self

    def quantize_int8(self, kernels) -> int:
        """Run fc, the layer's matrices (q|k|v and gate|up fused) and the LM head's rows as int8 Q8_0 blocks by the
        packed kernel (`kernels`: `model.cpu_kernels.load_kernels()`), for drafting only: the float weights stay
        for training. Returns the int8 bytes; 0 (nothing changed) if a width is not a multiple of 32."""
        layer = self.layer
        groups = {
            "fc": [self.fc.weight],
            "qkv": [layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight],
            "o": [layer.o_proj.weight],
            "gate_up": [layer.gate_proj.weight, layer.up_proj.weight],
            "down": [layer.down_proj.weight],
            "lm": [self._lm_rows if self._lm_rows is not None else self._parts().lm_head],
        }
        if any(w.shape[1] % BLOCK for ws in groups.values() for w in ws):
            return 0
        biases = {"fc": self.fc.bias}
        if self.config.qkv_bias:
            biases["qkv"] = torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias])
        with torch.no_grad():
            self._int8 = {
                name: (quantize_q8_0(torch.cat(ws)), None if name not in biases else biases[name].detach().float())
                for name, ws in groups.items()
            }
        self._kernels = kernels
        return sum(w.nbytes for w, _ in self._int8.values())

    def _linear(self, name: str, module: nn.Linear | None, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b of the matrix `name`: int8 once quantized, else `module` (or the LM head's rows)."""
        if name not in self._int8:
            return module(x) if module is not None else F.linear(x.to(self._lm_rows.dtype), self._lm_rows)
        packed, bias = self._int8[name]
        return packed.linear(x, self._kernels, bias)

    def _parts(self) -> TargetParts:
        if self.target is None:
            raise RuntimeError("attach the target's parts first (EagleHead.attach)")
        return self.target

    # ---- the layer ------------------------------------------------------------------------------------

    def fuse(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """fc([f_t ; E(x_{t+1})]): features [..., d], target token ids [...]."""
        t = self._parts()
        w = self.fc.weight
        emb = F.embedding(tokens.to(t.embed.device), t.embed).to(device=w.device, dtype=w.dtype)
        if t.embedding_multiplier != 1.0:
            emb = emb * t.embedding_multiplier
        return self._linear("fc", self.fc, torch.cat([features.to(w.dtype), emb], dim=-1))

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [..., Hq, D], k and v [..., Hkv, D] of rows x [..., d] at `positions` [...], RoPE applied."""
        c, t, layer = self.config, self._parts(), self.layer
        h = layer.input_layernorm(x)
        lead = x.shape[:-1]
        if self._int8:
            widths = [c.num_heads * c.head_dim] + [c.num_kv_heads * c.head_dim] * 2
            q, k, v = self._linear("qkv", None, h).split(widths, -1)
        else:
            q, k, v = layer.q_proj(h), layer.k_proj(h), layer.v_proj(h)
        q = q.reshape(*lead, c.num_heads, c.head_dim)
        k = k.reshape(*lead, c.num_kv_heads, c.head_dim)
        v = v.reshape(*lead, c.num_kv_heads, c.head_dim)
        pos = positions.to(t.cos.device)
        cos = t.cos[pos].to(device=x.device, dtype=x.dtype).unsqueeze(-2)
        sin = t.sin[pos].to(device=x.device, dtype=x.dtype).unsqueeze(-2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention (attn [..., Hq * D]): the predicted next features [..., d]."""
        layer = self.layer
        x = x + self._linear("o", layer.o_proj, attn)
        h = layer.post_attention_layernorm(x)
        if self._int8:
            gate, up = self._linear("gate_up", None, h).chunk(2, -1)
        else:
            gate, up = layer.gate_proj(h), layer.up_proj(h)
        return x + self._linear("down", layer.down_proj, F.silu(gate) * up)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool = False
    ) -> torch.Tensor:
        """SDPA with GQA over [B, T, H, D] inputs; returns [B, T, Hq * D]."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=causal,
            scale=self.config.attn_scale,
            enable_gqa=True,
        )
        return out.transpose(1, 2).flatten(-2)

    # ---- the LM head ----------------------------------------------------------------------------------

    def token_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Float32 logits [..., K] over the head's own rows (the draft vocabulary, or the whole target's)."""
        t = self._parts()
        logits = self._linear("lm", None, features).float()
        return logits / t.logits_scaling if t.logits_scaling != 1.0 else logits

    def own_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Row index of each target id in `token_logits`, IGNORE for ids outside the draft vocabulary."""
        if self.draft_vocab is None:
            return target_ids
        own = self.draft_vocab.to_draft(target_ids.clamp(min=0))
        return torch.where((own == self.draft_vocab.other) | (target_ids < 0), IGNORE, own)

    def target_ids(self, own_ids: torch.Tensor) -> torch.Tensor:
        if self.draft_vocab is None:
            return own_ids
        return self.draft_vocab.to_target(own_ids)

    # ---- whole windows (training, held-out evaluation) -------------------------------------------------

    def window_forward(self, features: torch.Tensor, tokens: torch.Tensor, steps: int = 1) -> list[torch.Tensor]:
        """Predicted features of `steps` chained steps over windows: `features` [B, T, d] are the target's at
        positions 0..T-1, `tokens` [B, T, steps] target ids, tokens[:, t, m] = x_{t+1+m}. Step 0 row t sees the
        true pairs 0..t and predicts f_{t+1}; step m row t feeds the head's own step m-1 output with x_{t+1+m} at
        position t+m, seeing the true pairs 0..t and its own chain (what drafting m+1 tokens after t computes).
        Right padding is harmless (rows never see later ones). Returns [B, T, d] per step."""
        b, n, _ = features.shape
        positions = torch.arange(n, device=features.device).expand(b, n)
        outs, ks, vs = [], [], []
        cur = features
        tril = torch.ones(n, n, dtype=torch.bool, device=features.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=features.device)
        for m in range(steps):
            x = self.fuse(cur, tokens[..., m])
            q, k, v = self.project(x, positions + m)
            ks.append(k)
            vs.append(v)
            if m == 0:
                attn = self.attend(q, k, v, None, causal=True)
            else:
                mask = torch.cat([tril] + [eye] * m, dim=1)
                attn = self.attend(q, torch.cat(ks, 1), torch.cat(vs, 1), mask)
            cur = self.finish(x, attn)
            outs.append(cur)
        return outs


def new_head(
    arch: ModelArch,
    draft_vocab: DraftVocab | None,
    target: TargetParts | None,
    seed: int = 0,
    draft_steps: int | None = None,
) -> EagleHead:
    """A freshly initialised head for `arch` (torch's default init, norms at 1), to be trained on chains of
    `draft_steps` tokens."""
    torch.manual_seed(seed)
    config = EagleConfig.from_arch(arch).model_copy(update={"draft_steps": draft_steps})
    return EagleHead(config, draft_vocab, target)


# ---- checkpoint folder ----------------------------------------------------------------------------------


def save_eagle(head: EagleHead, folder: str | Path) -> None:
    """Write config.json, model.safetensors (the head's own weights only) and the draft vocabulary, if any."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = next(head.parameters()).dtype
    config = head.config.model_dump() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {n: p.detach().contiguous().cpu() for n, p in head.named_parameters()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if head.draft_vocab is not None:
        head.draft_vocab.save(folder)


def read_eagle_config(folder: str | Path) -> EagleConfig:
    return read_drafter_config(folder, "specserve_eagle", EagleConfig, EagleLoadError, frozenset({"torch_dtype"}))


def load_eagle(
    folder: str | Path,
    target: TargetParts | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> EagleHead:
    """The head in `folder`, every weight read (unknown, missing or misshapen ones are errors), in eval mode,
    attached to `target` when given."""
    folder = Path(folder)
    config = read_eagle_config(folder)
    try:
        vocab = DraftVocab.load(folder)
        head = EagleHead(config, vocab)
    except (OSError, ValueError) as e:
        raise EagleLoadError(f"{folder}: draft vocabulary: {e}") from None
    path = folder / WEIGHTS_FILE
    if not path.exists():
        raise EagleLoadError(f"{folder}: no {WEIGHTS_FILE}")
    weights = load_file(str(path))
    params = dict(head.named_parameters())
    if set(weights) != set(params):
        odd = sorted(set(weights) ^ set(params))[0]
        raise EagleLoadError(f"{folder}: weights do not match the config, e.g. {odd}")
    with torch.no_grad():
        for name, w in weights.items():
            if params[name].shape != w.shape:
                raise EagleLoadError(f"{folder}: {name} is {list(w.shape)}, expected {list(params[name].shape)}")
            params[name].copy_(w)
    head = head.to(device=device, dtype=dtype).eval()
    if target is not None:
        head.attach(target)
    return head
