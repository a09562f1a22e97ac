"""EAGLE proposer: the head of `speculator.eagle` drafting top-1 chains over its own small KV per sequence.

Each request brings the target's hidden states of every row since the previous proposal (`hidden_rows = "all"`):
rows whose logits predicted token_ids[-n:], i.e. the features at positions L-n-1 .. L-2 of a sequence of L tokens.
The head's KV holds one entry per (feature at p, token p+1) pair. A proposal rolls that KV back to the true pairs
before position L-n-1 (a counter: drafted pairs, even accepted ones, were built on the head's own features and are
replaced by the target's), feeds the n new true pairs of every sequence in one flat batch, and then extends each
chain one token per batched step from its own predicted features. Linear layers run over all sequences' rows at
once; attention runs per sequence over its contiguous cache, so nothing is padded.

Drafts are the argmax chain for every request (`propose_trees` adds branches off it). For a sampled request that
is a point mass q (probs None), which `verify_sampled` accepts with probability p(x) and otherwise resamples from
p with x removed: the output keeps exactly the target's distribution (the head's real q is not used).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sampling.params import SamplingParams
from speculator.eagle import EagleHead
from speculator.proposer import Draft, DraftRequest, Proposer, tree_of_paths
from speculator.token_tree import TokenTree


@dataclass
class SequenceKV:
    """One sequence's head KV: entries 0..length-1 are positions base..base+length-1; those below `true_end` were
    built from the target's own features (`tokens` holds their x_{p+1}), the rest are drafts."""

    k: torch.Tensor  # [Hkv, capacity, D]
    v: torch.Tensor
    base: int = 0
    length: int = 0
    tokens: list[int] = field(default_factory=list)

    @property
    def true_end(self) -> int:
        return self.base + len(self.tokens)

    def rollback(self, position: int) -> None:
        """Keep only the true pairs before `position`."""
        keep = max(0, min(position, self.true_end) - self.base)
        del self.tokens[keep:]
        self.length = keep

    def reserve(self, n: int) -> None:
        need = self.length + n
        if need > self.k.shape[1]:
            cap = max(need, 2 * self.k.shape[1])
            grow = (self.k.shape[0], cap - self.k.shape[1], self.k.shape[2])
            self.k = torch.cat([self.k, self.k.new_zeros(grow)], dim=1)
            self.v = torch.cat([self.v, self.v.new_zeros(grow)], dim=1)


@dataclass
class _Rows:
    """One sequence's share of a flat head step: its rows' features, tokens and first position."""

    kv: SequenceKV
    features: torch.Tensor  # [n, d]
    tokens: list[int]
    start: int


class EagleProposer(Proposer):
    hidden_rows = "all"

    def __init__(self, head: EagleHead, initial_capacity: int = 256):
        if head.target is None:
            raise ValueError("the head must be attached to the target's parts")
        self.head = head.eval()
        # Deeper than its training chains, a head's drafts are almost never accepted: no slot is spent on them.
        self.max_k = head.config.draft_steps
        self.capacity = initial_capacity
        self.seqs: dict[int, SequenceKV] = {}
        p = next(head.parameters())
        self.device, self.dtype = p.device, p.dtype

    def release(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    def _new_kv(self, base: int) -> SequenceKV:
        c = self.head.config
        shape = (c.num_kv_heads, self.capacity, c.head_dim)
        z = torch.zeros(shape, device=self.device, dtype=self.dtype)
        return SequenceKV(z, z.clone(), base=base)

    def _true_rows(self, r: DraftRequest) -> _Rows | None:
        """The request's new true pairs, the sequence's KV rolled back to just before them."""
        if r.hidden is None or r.hidden.shape[0] == 0 or len(r.token_ids) < 2:
            return None
        n = min(r.hidden.shape[0], len(r.token_ids) - 1)
        start = len(r.token_ids) - 1 - n  # position of the first new feature
        kv = self.seqs.get(r.seq_id)
        if kv is not None and (start > kv.true_end or start < kv.base):
            kv = None  # a gap (rows never seen) or rows before its start: begin again from these rows
        if kv is not None and kv.tokens[: start - kv.base] != r.token_ids[kv.base + 1 : start + 1]:
            kv = None  # the sequence's tokens changed under it (e.g. recomputed differently)
        if kv is None:
            kv = self.seqs[r.seq_id] = self._new_kv(start)
        kv.rollback(start)
        return _Rows(kv, r.hidden[-n:], r.token_ids[start + 1 :], start)

    @torch.inference_mode()
    def _step(self, rows: list[_Rows], true: bool) -> torch.Tensor:
        """Feed every sequence's rows, append their K/V; the predicted feature of each sequence's last row."""
        head = self.head
        feats = torch.cat([r.features.to(device=self.device, dtype=self.dtype) for r in rows])
        tokens = torch.tensor([t for r in rows for t in r.tokens], device=self.device)
        positions = torch.cat([torch.arange(r.start, r.start + len(r.tokens)) for r in rows]).to(self.device)
        x = head.fuse(feats, tokens)
        q, k, v = head.project(x, positions)
        attn = torch.empty(q.shape[0], q.shape[1] * q.shape[2], device=self.device, dtype=self.dtype)
        i = 0
        for r in rows:
            n, kv = len(r.tokens), r.kv
            kv.reserve(n)
            kv.k[:, kv.length : kv.length + n] = k[i : i + n].transpose(0, 1)
            kv.v[:, kv.length : kv.length + n] = v[i : i + n].transpose(0, 1)
            kv.length += n
            if true:
                kv.tokens.extend(r.tokens)
            mask = None
            if n > 1:  # query j (entry length-n+j) sees entries up to its own
                mask = torch.ones(n, kv.length, dtype=torch.bool, device=self.device).tril(kv.length - n)
            attn[i : i + n] = self._attend(q[i : i + n], kv, mask)
            i += n
        ends = torch.tensor([len(r.tokens) for r in rows], device=self.device).cumsum(0) - 1
        return head.finish(x[ends], attn[ends])

    def _attend(self, q: torch.Tensor, kv: SequenceKV, mask: torch.Tensor | None) -> torch.Tensor:
        """One sequence's queries [n, Hq, D] over its cache, GQA by grouping query heads per KV head (plain
        matmuls: for a handful of rows they beat SDPA's dispatch); returns [n, Hq * D]."""
        n, hq, d = q.shape
        hkv = kv.k.shape[0]
        g = hq // hkv
        q = q.view(n, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * n, d)
        scores = torch.matmul(q, kv.k[:, : kv.length].transpose(1, 2)) * self.head.config.attn_scale
        if mask is not None:
            scores = scores.view(hkv, g, n, -1).masked_fill(~mask, float("-inf")).view(hkv, g * n, -1)
        out = torch.matmul(torch.softmax(scores, dim=-1), kv.v[:, : kv.length])
        return out.view(hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, hq * d)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(chain) for chain, _ in self._chains(requests, 1)]

    def propose_trees(self, requests: list[DraftRequest], n: int) -> list[TokenTree]:
        """The top-1 chain and up to n - 1 paths that leave it once: the chain to depth i, then the head's i-th
        next-best token there, the most probable such branches by the head's own probabilities. The head runs
        along the chain only (a branch adds verified rows, no head step)."""
        trees = []
        for r, (chain, branches) in zip(requests, self._chains(requests, n)):
            best = sorted(branches, reverse=True)[: n - 1]
            trees.append(tree_of_paths(r, [chain] + [chain[:depth] + [tok] for _, depth, tok in best]))
        return trees

    def _chains(self, requests: list[DraftRequest], width: int) -> list[tuple[list[int], list[tuple[float, int, int]]]]:
        """Per request its argmax chain and, with `width` > 1, the branches off it: (log-probability of the path,
        depth, token) for the next `width - 1` tokens at each depth."""
        out: list[tuple[list[int], list[tuple[float, int, int]]]] = [([], []) for _ in requests]
        live = [(i, rows) for i, r in enumerate(requests) if (rows := self._true_rows(r)) is not None]
        if not live:
            return out
        # Every sequence with new rows is fed, k = 0 included, so its KV stays in step with the target.
        feats = self._step([rows for _, rows in live], true=True)
        keep = [j for j, (i, _) in enumerate(live) if requests[i].k > 0]
        chain, feats = [live[j] for j in keep], feats[keep]
        path_logp = dict.fromkeys((i for i, _ in chain), 0.0)
        while chain:
            with torch.inference_mode():
                logits = self.head.token_logits(feats)
                if width > 1:
                    top = torch.log_softmax(logits.float(), -1).topk(min(width, logits.shape[-1]), -1)
                    scores, picks = top.values.tolist(), self.head.target_ids(top.indices).tolist()
                else:
                    picks = [[t] for t in self.head.target_ids(logits.argmax(-1)).tolist()]
            nxt = []
            for j, (i, rows) in enumerate(chain):
                tokens, branches = out[i]
                if width > 1:
                    depth, base = len(tokens), path_logp[i]
                    branches.extend((base + lp, depth, t) for lp, t in zip(scores[j][1:], picks[j][1:]))
                    path_logp[i] = base + scores[j][0]
                tok = picks[j][0]
                tokens.append(tok)
                if len(tokens) < requests[i].k:
                    nxt.append((i, _Rows(rows.kv, feats[j : j + 1], [tok], rows.start + len(rows.tokens))))
            if not nxt:
                break
            chain = nxt
            feats = self._step([rows for _, rows in chain], true=False)
        return out


def proposal_seconds(head: EagleHead, k: int, context: int = 128, repeats: int = 30) -> float:
    """Median wall time of one proposal of k tokens for one sequence at `context` tokens, one new true row per
    proposal as in steady decoding."""
    proposer = EagleProposer(head)
    d = head.config.hidden_size
    params = SamplingParams(max_tokens=1, temperature=0.0)
    tokens = [1] * context
    proposer.propose([DraftRequest(0, tokens, k, params, hidden=torch.randn(context - 1, d))])
    times = []
    for _ in range(repeats + 3):
        tokens = tokens + [1]
        request = DraftRequest(0, tokens, k, params, hidden=torch.randn(1, d))
        t0 = time.perf_counter()
        proposer.propose([request])
        times.append(time.perf_counter() - t0)
    return sorted(times[3:])[repeats // 2]
