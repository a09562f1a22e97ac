"""A Llama-family decoder (Llama, Mistral, Qwen2, Granite) over a paged KV cache.

The batch is flat: T tokens from any mix of prefill chunks, decode steps and speculative verification, with
their positions; attention finds each sequence's context through the backend's metadata. q/k/v and
gate/up are fused column-parallel matmuls, o/down row-parallel, so a rank holds only its slice of heads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.attention.paged import AttentionBackend, AttnMetadata
from model.kv_pages import KVPages
from model.loader import ModelArch, ModelLoadError, iter_weights, rope_cos_sin
from model.parallel import (
    ColumnParallelLinear,
    ParallelContext,
    RowParallelLinear,
    VocabParallelEmbedding,
    drop_float_weight,
    kernel_weight,
)
from model.quant import PackedWeight, quantize_q8_0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.fused = None  # the CPU kernels' module, set by CausalLM.use_cpu_kernels

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x); with `delta`, first x += delta in place (the residual stream), in the same pass."""
        if self.fused is not None:
            return self.fused.rms_norm(x, delta, self.weight, self.eps)
        if delta is not None:
            x.add_(delta)
        if x.dtype == torch.float32:  # one op; lower precisions normalise in float32 like HF does
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half convention of Hugging Face checkpoints; x [T, H, D], cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, tp: ParallelContext):
        super().__init__()
        self.arch = arch
        if arch.num_heads % arch.num_kv_heads:
            raise ValueError(f"{arch.num_heads} query heads do not form groups over {arch.num_kv_heads} KV heads")
        if tp.world_size > arch.num_kv_heads:
            raise ValueError(f"tensor_parallel_size={tp.world_size} exceeds the model's {arch.num_kv_heads} KV heads")
        # Attention splits by whole GQA groups (one KV head and its query heads), unevenly where the KV heads do
        # not divide: e.g. 3 KV heads on 2 ranks give rank 0 two groups and rank 1 one.
        group, d = arch.num_heads // arch.num_kv_heads, arch.head_dim
        self.num_kv_heads = tp.span(arch.num_kv_heads)[1]
        self.num_heads = self.num_kv_heads * group
        kv = arch.num_kv_heads * d
        self.input_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.qkv = ColumnParallelLinear(
            arch.hidden_size, [arch.num_heads * d, kv, kv], tp, bias=arch.qkv_bias, units=[group * d, d, d]
        )
        self.o_proj = RowParallelLinear(arch.num_heads * d, arch.hidden_size, tp, unit=group * d)
        self.post_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.gate_up = ColumnParallelLinear(arch.hidden_size, [arch.intermediate_size] * 2, tp)
        self.down = RowParallelLinear(arch.intermediate_size, arch.hidden_size, tp)
        self.fused = None  # the CPU kernels' module, set by CausalLM.use_cpu_kernels

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttnMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        t, d, hq, hkv = x.shape[0], self.arch.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.qkv(self.input_norm(x)).view(t, hq + 2 * hkv, d)
        qk = self._rope(qkv[:, : hq + hkv], cos, sin)  # q and k heads are adjacent: one RoPE pass for both
        attn = backend.forward(qk[:, :hq], qk[:, hq:], qkv[:, hq + hkv :], kv[0], kv[1], meta, self.arch.attn_scale)
        h = self.post_norm(x, self._scaled(self.o_proj(attn.reshape(t, -1))))  # x += attention output
        return x.add_(self._scaled(self.down(self._act(self.gate_up(h)))))

    def _rope(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.fused is None:
            return rotate(qk, cos, sin)
        self.fused.rope_(qk, cos, sin)  # in place
        return qk

    def _act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the fused gate|up projection."""
        if self.fused is not None:
            return self.fused.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:
        m = self.arch.residual_multiplier
        return h if m == 1.0 else h * m


class CausalLM(nn.Module):
    def __init__(self, arch: ModelArch, tp: ParallelContext, num_layers: int | None = None):
        super().__init__()
        self.arch = arch
        self.tp = tp
        self.embed = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(arch, tp) for _ in range(num_layers or arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = (
            self.embed if arch.tie_word_embeddings else VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp)
        )
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.stack_kernels = None  # the CPU kernels' module when the layers may run as one C++ call (None: never)
        self._stack = None  # that call's DecoderStack over the current weights, built at first use

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVPages,
        meta: AttnMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        x = self.embed(input_ids)
        if self.arch.embedding_multiplier != 1.0:
            x = x * self.arch.embedding_multiplier
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        g = meta.inplace_only()
        stack = self.decoder_stack() if g is not None else None
        if stack is not None and x.shape[0] <= stack.max_rows():
            slots = meta.slot_mapping
            x = stack.forward(x, cos, sin, kv.data, slots, g.block_tables, g.row_seq, g.row_keys, g.row_mask)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, kv.layer(i), meta, backend)
        return self.norm(x)

    def decoder_stack(self):
        """Every layer as one C++ call for decode and verification steps (`model/csrc/decoder_stack.cpp`: the
        same kernels in the same order, without a dozen Python calls per layer); None where it does not apply."""
        if self.stack_kernels is None:
            return None
        if self._stack is None:
            a = self.arch
            stack = self.stack_kernels.DecoderStack(
                self.layers[0].num_heads,
                self.layers[0].num_kv_heads,
                a.head_dim,
                a.rms_norm_eps,
                a.attn_scale,
                a.residual_multiplier,
            )
            for layer in self.layers:
                parts = [kernel_weight(m) for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
                weights, qtypes, rows = (list(p) for p in zip(*parts))
                stack.add_layer(layer.input_norm.weight, layer.post_norm.weight, weights, qtypes, rows, layer.qkv.bias)
            self._stack = stack
        return self._stack

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.lm_head.logits(hidden).float()
        return out / self.arch.logits_scaling if self.arch.logits_scaling != 1.0 else out

    def use_cpu_kernels(self, kernels) -> None:
        """Route the few-row matmuls (decode, verification) through the C++ small matmul, and the norms, RoPE and
        MLP activation through fused ops (`model.cpu_kernels`; float32 on CPU)."""
        for module in self.modules():
            if hasattr(module, "small_matmul"):
                module.small_matmul = kernels.small_matmul
            if hasattr(module, "fused"):
                module.fused = kernels
            if hasattr(module, "kernels"):
                module.kernels = kernels
        self.stack_kernels = kernels if self.tp.world_size == 1 else None
        self._stack = None

    def packed_matrices(self) -> list[PackedWeight]:
        """The matrices a step multiplies packed: every layer's and the LM head's."""
        modules = [m for layer in self.layers for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
        return [m.quant for m in [*modules, self.lm_head] if m.quant is not None]

    def use_packed(self, packed: dict[str, PackedWeight]) -> list[str]:
        """Run the linear layers (and the LM head) on the checkpoint matrices `packed` holds in GGUF blocks
        (`model.gguf_weights.read_packed`); a layer with a matrix missing there keeps its float32 weight. Returns
        the names of the matrices in use, packed. Needs `use_cpu_kernels` before a forward."""
        used: list[str] = []
        self._stack = None  # it holds the float32 matrices

        def take(names: list[str]) -> list[PackedWeight] | None:
            if not all(n in packed for n in names):
                return None
            used.extend(names)
            return [packed[n] for n in names]

        for i, layer in enumerate(self.layers):
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            if parts := take([f"{attn}.{p}_proj.weight" for p in "qkv"]):
                layer.qkv.use_packed(parts)
            if parts := take([f"{attn}.o_proj.weight"]):
                layer.o_proj.use_packed(parts[0])
            if parts := take([f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"]):
                layer.gate_up.use_packed(parts)
            if parts := take([f"{mlp}.down_proj.weight"]):
                layer.down.use_packed(parts[0])
        head = "model.embed_tokens.weight" if self.arch.tie_word_embeddings else "lm_head.weight"
        if parts := take([head]):
            self.lm_head.use_packed(parts[0])
        return used

    def quantize_int8(self) -> int:
        """Quantize every linear layer and the LM head that still runs on float32 weights to int8 (Q8_0 blocks,
        `model.quant.quantize_q8_0`), run by the packed kernel; the embedding table stays float32 for the token
        lookup. Returns the bytes of the int8 matrices. Needs `use_cpu_kernels` before a forward."""
        total = 0
        self._stack = None  # it holds the float32 matrices
        modules = [m for layer in self.layers for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
        for module in [*modules, self.lm_head]:
            if module.quant is None:
                module.quant, module.packed = quantize_q8_0(module.weight), None
                if module is not self.lm_head:
                    drop_float_weight(module)
            total += module.quant.nbytes
        return total

    def load(self, folder: Path, max_len: int, packed: dict[str, PackedWeight] | None = None) -> None:
        """Load this rank's slices of the checkpoint; layers beyond num_layers are skipped (truncated drafts).
        With `packed`, the matrices it holds run in their GGUF blocks (`use_packed`)."""
        cos, sin = rope_cos_sin(folder, max_len)
        self.cos, self.sin = cos.to(self.embed.weight), sin.to(self.embed.weight)
        n_layers = len(self.layers)
        seen: set[str] = set()
        qkv_index = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
        with torch.no_grad():
            for name, w in iter_weights(folder):
                parts = name.split(".")
                if name == "model.embed_tokens.weight":
                    self.embed.load(w)
                elif name == "lm_head.weight":
                    if not self.arch.tie_word_embeddings:
                        self.lm_head.load(w)
                elif name == "model.norm.weight":
                    self.norm.weight.copy_(w[:])
                elif parts[:2] == ["model", "layers"]:
                    i = int(parts[2])
                    if i >= n_layers:
                        continue
                    layer, module, leaf = self.layers[i], parts[-2], parts[-1]
                    if module in qkv_index and (leaf == "weight" or layer.qkv.bias is not None):
                        layer.qkv.load_part(qkv_index[module], w, leaf)
                    elif module == "o_proj":
                        layer.o_proj.load(w)
                    elif module in ("gate_proj", "up_proj"):
                        layer.gate_up.load_part(0 if module == "gate_proj" else 1, w)
                    elif module == "down_proj":
                        layer.down.load(w)
                    elif module == "input_layernorm":
                        layer.input_norm.weight.copy_(w[:])
                    elif module == "post_attention_layernorm":
                        layer.post_norm.weight.copy_(w[:])
                    else:
                        continue
                else:
                    continue
                seen.add(name)
        needed = {"model.embed_tokens.weight", "model.norm.weight"}
        if not self.arch.tie_word_embeddings:
            needed.add("lm_head.weight")
        for i in range(n_layers):
            needed |= {f"model.layers.{i}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
            needed |= {f"model.layers.{i}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
        missing = needed - seen
        if missing:
            raise ModelLoadError(f"checkpoint in {folder} lacks {len(missing)} weights, e.g. {sorted(missing)[0]}")
        if packed:
            self.use_packed(packed)
        for module in self.modules():
            if module is not self and hasattr(module, "finalize"):
                module.finalize()
