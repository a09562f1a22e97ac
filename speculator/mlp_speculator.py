"""IBM's MLP speculator (arXiv 2404.19124; fms-extras `MLPSpeculator`, vLLM `mlp_speculator`).

From the target's final hidden state at the last accepted position t and the token t+1 it sampled, `n_predict`
stages run as an RNN over draft tokens: stage i reads the state and the embedding of the token it extends,

    state = GELU(LN_i(proj_i(state) + (emb_weight / state_weight) * emb_i(token)))    logits_i = head_i(state)

so stage 0 predicts t+2 and stage i predicts t+2+i. `state_weight = 0.5 ** (0.5 / n_predict)` and `emb_weight =
sqrt((1 - state_weight**2) * inner_dim / 2)` keep the initial state at about half the state's magnitude by the last
stage; the sum is written as vLLM writes it (IBM's `state_weight * proj + emb_weight * emb` up to the scale LN_i
removes). IBM's "LayerNorm" is RMS-style with a bias; `scale_input` first normalises the hidden state (no affine)
and divides it by sqrt(2). With `tie_weights` every stage shares stage 0's embedding, head and norm, and stages
2.. share stage 1's projection (stage 0's projection reads the target's width, so it stays its own).

The model works in its own vocabulary (`vocab_size` rows); with a `DraftVocab` those are the draft ids, and the
proposal functions take and return target ids, never proposing the reserved "other" row.

For serving on CPU the projections and heads may run as int8 (`quantize_int8`: Q8_0 blocks through the target's
packed matmul kernel): the heads grow with the draft vocabulary and are most of a proposal's bytes, and int8 reads a
quarter of float32's. Training keeps float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from model.quant import BLOCK, PackedWeight, quantize_q8_0
from speculator.draft_vocab import DraftVocab


class MLPSpeculatorConfig(BaseModel):
    """The config.json of IBM's published speculators (Hugging Face `model_type` "mlp_speculator")."""

    model_config = ConfigDict(extra="forbid")

    model_type: Literal["mlp_speculator"] = "mlp_speculator"
    emb_dim: int = Field(ge=1, description="the target's hidden size")
    inner_dim: int = Field(default=0, ge=0, description="the speculator's state width; 0 = emb_dim")
    vocab_size: int = Field(ge=1, description="rows of the embeddings and heads")
    n_predict: int = Field(default=3, ge=1)
    top_k_tokens_per_head: list[int] | None = Field(default=None, description="tree width per stage; None = 1s")
    n_candidates: int = Field(default=5, ge=1, description="tree paths kept for verification")
    tie_weights: bool = False
    scale_input: bool = False

    @model_validator(mode="after")
    def _check(self) -> MLPSpeculatorConfig:
        if self.top_k_tokens_per_head is None:
            self.top_k_tokens_per_head = [1] * self.n_predict
        if len(self.top_k_tokens_per_head) != self.n_predict or min(self.top_k_tokens_per_head) < 1:
            raise ValueError(f"top_k_tokens_per_head needs {self.n_predict} positive widths, one per stage")
        if self.tie_weights and self.n_predict < 2:
            raise ValueError("tie_weights needs n_predict >= 2 (weights are tied between stages)")
        return self

    @property
    def width(self) -> int:
        return self.inner_dim or self.emb_dim


class SpeculatorNorm(nn.Module):
    """IBM's `LayerNormParameterized` as its speculators use it: x * rsqrt(mean(x^2) + eps), then * weight + bias
    (no mean subtraction); without `affine`, the normalisation alone. Computed in float32."""

    def __init__(self, dim: int, affine: bool, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return h if self.weight is None else h * self.weight + self.bias


@dataclass
class ChainProposal:
    """Greedy chains in target ids: row b's first `lengths[b]` tokens of `tokens` [B, k] are its draft (a chain
    stops before a stage whose best guess is the reserved "other" row)."""

    tokens: torch.Tensor
    lengths: torch.Tensor


@dataclass
class TreeProposal:
    """The top tokens per stage expanded into paths (IBM's `generate_suffixes`), in target ids, best first by
    summed log-probability: `paths` [B, C, n], `token_log_probs` [B, C, n] per stage, `path_log_probs` [B, C]."""

    paths: torch.Tensor
    token_log_probs: torch.Tensor
    path_log_probs: torch.Tensor


class MLPSpeculator(nn.Module):
    def __init__(self, config: MLPSpeculatorConfig, draft_vocab: DraftVocab | None = None):
        super().__init__()
        self.config = config
        n, d, inner, v = config.n_predict, config.emb_dim, config.width, config.vocab_size
        if draft_vocab is not None and draft_vocab.num_rows != v:
            raise ValueError(f"draft vocabulary of {len(draft_vocab.ids)} tokens (+1 reserved) != vocab_size {v}")
        self.draft_vocab = draft_vocab
        self.n_predict, self.inner_dim = n, inner
        self.state_weight = 0.5 ** (0.5 / n)
        self.emb_weight = math.sqrt((1 - self.state_weight**2) * (inner / 2))
        self.emb = nn.ModuleList(nn.Embedding(v, inner) for _ in range(n))
        self.proj = nn.ModuleList(nn.Linear(d if i == 0 else inner, inner, bias=False) for i in range(n))
        self.head = nn.ModuleList(nn.Linear(inner, v, bias=False) for _ in range(n))
        self.ln = nn.ModuleList(SpeculatorNorm(inner, affine=True) for _ in range(n))
        self.ln0 = SpeculatorNorm(d, affine=False) if config.scale_input else None
        if config.tie_weights:
            for i in range(1, n):
                self.emb[i].weight = self.emb[0].weight
                self.head[i].weight = self.head[0].weight
                self.ln[i].weight, self.ln[i].bias = self.ln[0].weight, self.ln[0].bias
                if i >= 2:
                    self.proj[i].weight = self.proj[1].weight
        self._int8: dict[tuple[str, int], PackedWeight] = {}  # (proj|head, stage) -> blocks: quantize_int8
        self._kernels = None
        if draft_vocab is not None:
            self.register_buffer("to_draft", draft_vocab.draft_index(), persistent=False)
            self.register_buffer("to_target", draft_vocab.target_index(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """IBM's initialisation: N(0, 1/sqrt(inner)) for embeddings and linears, norms 1 and 0."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Embedding, nn.Linear)):
                    nn.init.normal_(m.weight, 0.0, 1 / math.sqrt(self.inner_dim))
                elif isinstance(m, SpeculatorNorm) and m.weight is not None:
                    m.weight.fill_(1.0)
                    m.bias.zero_()

    def quantize_int8(self, kernels) -> int:
        """Run the projections and heads as int8 Q8_0 blocks by the packed kernel (`kernels`:
        `model.cpu_kernels.load_kernels()`), for drafting only: the float weights stay for training. Tied stages
        share their blocks. Returns the int8 bytes; 0 (nothing changed) if a width is not a multiple of 32."""
        linears = {(name, i): m for name in ("proj", "head") for i, m in enumerate(getattr(self, name))}
        if any(m.weight.shape[1] % BLOCK for m in linears.values()):
            return 0
        by_weight: dict[int, PackedWeight] = {}
        with torch.no_grad():
            for key, m in linears.items():
                if id(m.weight) not in by_weight:
                    by_weight[id(m.weight)] = quantize_q8_0(m.weight)
                self._int8[key] = by_weight[id(m.weight)]
        self._kernels = kernels
        return sum(w.nbytes for w in by_weight.values())

    def _linear(self, name: str, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage i's projection or head of rows x [..., in]: int8 once quantized, else the float layer."""
        packed = self._int8.get((name, i))
        if packed is None:
            return getattr(self, name)[i](x)
        return packed.linear(x, self._kernels).to(x.dtype)

    # ---- the network, in the speculator's own vocabulary ----------------------------------------------

    def input_state(self, hidden: torch.Tensor) -> torch.Tensor:
        """The initial state from the target's hidden states [..., emb_dim]."""
        hidden = hidden.to(self.proj[0].weight.dtype)
        return self.ln0(hidden) / math.sqrt(2) if self.ln0 is not None else hidden

    def stage(self, i: int, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Stage i's new state from the previous one and the (own-vocabulary) tokens it extends."""
        z = self.emb[i](tokens)
        return F.gelu(self.ln[i](self._linear("proj", i, state) + z * (self.emb_weight / self.state_weight)))

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [n_predict, ..., vocab_size]: `hidden` [..., emb_dim] at t, `tokens` [...,
        n_predict] own-vocabulary ids of t+1 .. t+n_predict (stage i reads tokens[..., i], predicts t+2+i)."""
        state, out = self.input_state(hidden), []
        for i in range(self.n_predict):
            state = self.stage(i, state, tokens[..., i])
            out.append(self._linear("head", i, state))
        return torch.stack(out)

    # ---- vocabulary mapping ---------------------------------------------------------------------------

    def own_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        return target_ids if self.draft_vocab is None else self.to_draft[target_ids]

    def target_ids(self, own_ids: torch.Tensor) -> torch.Tensor:
        return own_ids if self.draft_vocab is None else self.to_target[own_ids.clamp(max=len(self.to_target) - 1)]

    def _log_probs(self, i: int, state: torch.Tensor) -> torch.Tensor:
        logits = self._linear("head", i, state).float()
        if self.draft_vocab is not None:
            logits[..., self.draft_vocab.other] = float("-inf")  # the reserved row is never proposed
        return torch.log_softmax(logits, dim=-1)

    # ---- proposals ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def propose_chain(self, hidden: torch.Tensor, tokens: torch.Tensor, k: int | None = None) -> ChainProposal:
        """Top-1 per stage for `k` (<= n_predict) stages: `hidden` [B, emb_dim] at t, `tokens` [B] target ids of
        t+1. A chain ends where a stage's best guess is the reserved row (a token outside the draft vocabulary)."""
        k = self.n_predict if k is None else k
        if not 0 <= k <= self.n_predict:
            raise ValueError(f"k={k} outside [0, n_predict={self.n_predict}]")
        state, cur, own = self.input_state(hidden), self.own_ids(tokens), []
        for i in range(k):  # as few small ops per stage as the chain needs: one proposal is a few of them
            state = self.stage(i, state, cur)
            cur = self._linear("head", i, state).argmax(-1)
            own.append(cur)
        own_ids = torch.stack(own, dim=1) if own else tokens.new_zeros(tokens.shape[0], 0)
        alive = torch.ones_like(own_ids, dtype=torch.bool)
        if self.draft_vocab is not None:
            alive = (own_ids != self.draft_vocab.other).cumprod(dim=1).bool()
        return ChainProposal(self.target_ids(own_ids), alive.sum(dim=1))

    @torch.inference_mode()
    def propose_tree(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        top_k_tokens_per_head: list[int] | None = None,
        n_candidates: int | None = None,
    ) -> TreeProposal:
        """The top `top_k_tokens_per_head[i]` tokens of stage i after each path so far (every stage runs on each
        path's own state), pruned to the `n_candidates` paths of highest summed log-probability."""
        topk = top_k_tokens_per_head or self.config.top_k_tokens_per_head
        n_cand = n_candidates or self.config.n_candidates
        if len(topk) > self.n_predict or min(topk) < 1:
            raise ValueError(f"top_k_tokens_per_head {topk} must give 1..{self.n_predict} positive widths")
        b = tokens.shape[0]
        state = self.input_state(hidden)[:, None]  # [B, paths, d]
        cur = self.own_ids(tokens)[:, None]  # [B, paths]
        paths = torch.zeros(b, 1, 0, dtype=torch.long, device=tokens.device)
        token_lp = torch.zeros(b, 1, 0, device=tokens.device)
        for i, width in enumerate(topk):
            state = self.stage(i, state, cur)
            lp, idx = self._log_probs(i, state).topk(width, dim=-1)  # [B, paths, width]
            p = paths.shape[1]
            state = state[:, :, None].expand(-1, -1, width, -1).reshape(b, p * width, -1)
            cur = idx.reshape(b, p * width)
            paths = torch.cat([paths.repeat_interleave(width, 1), self.target_ids(cur)[..., None]], dim=-1)
            token_lp = torch.cat([token_lp.repeat_interleave(width, 1), lp.reshape(b, p * width, 1)], dim=-1)
        total = token_lp.sum(-1)
        order = total.argsort(dim=-1, descending=True)[:, :n_cand]
        pick = order[..., None].expand(-1, -1, paths.shape[-1])
        return TreeProposal(paths.gather(1, pick), token_lp.gather(1, pick), total.gather(1, order))
