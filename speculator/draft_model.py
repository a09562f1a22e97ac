"""Draft-model proposer: a smaller model with the target's tokenizer and its own paged KV cache.

The draft's KV follows each sequence's accepted tokens: before proposing, it finds how much of what it fed
last time survived verification (a counter, nothing is copied), feeds the rest in one batched catch-up pass,
then extends every sequence one token per batched step until each has its k drafts. Greedy requests get
argmax drafts (point mass); sampled requests draw from the draft's processed distribution q, which is
returned for rejection sampling. A request's logits controls (penalties, logit_bias, min_tokens) process the
draft's logits by the target's rule, with the tokens drafted so far in the context, so drafts rarely propose
what the target's processed distribution rules out.
"""

from __future__ import annotations

import torch

from kv_cache.block_manager import BlockManager
from model.runner import ModelRunner, StepInput
from sampling.sampler import make_generator, processed_probs
from speculator.proposer import Draft, DraftRequest, Proposer


class DraftModelProposer(Proposer):
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.bm = BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching=True)
        self.fed: dict[int, list[int]] = {}  # tokens whose KV the draft holds, per sequence
        self.generators: dict[int, torch.Generator] = {}

    def release(self, seq_id: int) -> None:
        self.fed.pop(seq_id, None)
        self.generators.pop(seq_id, None)
        if self.bm.has(seq_id):
            self.bm.free(seq_id)

    def _catch_up(self, r: DraftRequest) -> StepInput | None:
        """Roll the draft's KV back to the common prefix with the accepted tokens and reserve room for k."""
        fed = self.fed.get(r.seq_id)
        if fed is None:
            fed = self.fed[r.seq_id] = []
            fed_len = self.bm.allocate(r.seq_id, r.token_ids)
            fed.extend(r.token_ids[:fed_len])
        n = 0
        limit = min(len(fed), len(r.token_ids) - 1)
        while n < limit and fed[n] == r.token_ids[n]:
            n += 1
        del fed[n:]
        copies = self.bm.append_slots(r.seq_id, n, len(r.token_ids) + r.k - 1)
        if copies is None:  # draft pool full: no proposal for this sequence, give its pages back
            self.release(r.seq_id)
            return None
        self.runner.copy_blocks(copies)
        new = r.token_ids[n:]
        fed.extend(new)
        return StepInput(new, n, self.bm.block_table(r.seq_id), 1)

    def _pick(
        self, logits: torch.Tensor, reqs: list[DraftRequest], drafted: list[list[int]]
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        """One draft token per request from its logits row; `drafted` = its draft tokens so far."""
        if any(r.controls is not None for r in reqs):
            logits = torch.cat(
                [
                    logits[i : i + 1] if r.controls is None else r.controls.apply(logits[i : i + 1], r.token_ids + d)
                    for i, (r, d) in enumerate(zip(reqs, drafted))
                ]
            )
        tokens: list[int] = logits.argmax(-1).tolist()
        probs: list[torch.Tensor | None] = [None] * len(reqs)
        for i, r in enumerate(reqs):
            if not r.params.greedy:
                g = self.generators.setdefault(
                    r.seq_id, make_generator(None if r.params.seed is None else r.params.seed + 1, self.runner.device)
                )
                try:
                    probs[i] = processed_probs(logits[i : i + 1], r.params)[0]
                    tokens[i] = int(torch.multinomial(probs[i], 1, generator=g))
                except (ValueError, RuntimeError):  # no usable draft distribution: propose the argmax as a
                    probs[i] = torch.zeros_like(logits[i], dtype=torch.float32)  # point mass (still exact)
                    probs[i][tokens[i]] = 1.0
        return tokens, probs

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = [Draft([]) for _ in requests]
        q: list[list[torch.Tensor]] = [[] for _ in requests]
        active, inputs = [], []
        for i, r in enumerate(requests):
            if r.k > 0 and (item := self._catch_up(r)) is not None:
                active.append(i)
                inputs.append(item)
        step = 0
        while active:
            logits = self.runner.execute(inputs)
            reqs = [requests[i] for i in active]
            tokens, probs = self._pick(logits, reqs, [drafts[i].tokens for i in active])
            step += 1
            next_active, next_inputs = [], []
            for i, item, tok, p in zip(active, inputs, tokens, probs):
                drafts[i].tokens.append(tok)
                if p is not None:
                    q[i].append(p)
                r = requests[i]
                if step < r.k:
                    fed = self.fed[r.seq_id]
                    next_inputs.append(StepInput([tok], len(fed), item.block_table, 1))
                    fed.append(tok)
                    next_active.append(i)
            active, inputs = next_active, next_inputs
        for i, r in enumerate(requests):
            if q[i]:
                drafts[i].probs = torch.stack(q[i])
            # Only accepted tokens become prefix-cacheable; the drafted tail may be rolled back next call.
            if drafts[i].tokens:
                self.bm.commit(r.seq_id, r.token_ids, len(r.token_ids))
        return drafts
