"""IBM's MLP speculator as a proposer: one greedy chain per sequence, every sequence of a step in one call.

It reads the target's hidden row that chose the newest token (`hidden_rows = "last"`) and that token, and its
stages guess the next `min(k, n_predict)` tokens. Sampled requests get the same argmax chain as a point-mass draft
(`probs` None): verification then accepts a token x with probability p(x) and resamples from p without x, which
keeps the target's distribution exactly, whatever the drafter guessed (speculator/verify.py). Sampling from the
heads instead would need each head's q over the target's vocabulary on every step, for little gain: the heads are
trained on the target's greedy outputs.

Several candidates (`propose_trees`): the top tokens per stage, each stage run on every path's own state, pruned
to the n most probable paths (IBM's `top_k_tokens_per_head` and `n_candidates`). A checkpoint whose widths are all
1 branches n ways at the first stage and 2 ways at the second: n paths that differ early, where a guess is
cheapest to replace, at 2n states per stage at most.
"""

from __future__ import annotations

from pathlib import Path

import torch

from speculator.mlp_checkpoint import load_speculator
from speculator.mlp_speculator import MLPSpeculator
from speculator.proposer import Draft, DraftRequest, Proposer, tree_of_paths
from speculator.token_tree import TokenTree


class MLPProposer(Proposer):
    hidden_rows = "last"

    def __init__(self, model: MLPSpeculator):
        self.model = model.eval()
        self.max_k = model.n_predict
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        target_hidden_size: int,
        target_vocab_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> MLPProposer:
        """The drafter in `folder` (IBM's format), checked against the target it will read; ValueError (one line)
        if it was made for another hidden size or vocabulary."""
        model = load_speculator(folder, device=device, dtype=dtype)
        cfg, vocab = model.config, model.draft_vocab
        if cfg.emb_dim != target_hidden_size:
            raise ValueError(f"{folder}: drafter reads hidden size {cfg.emb_dim}, the target's is {target_hidden_size}")
        drafter_vocab = vocab.target_vocab_size if vocab is not None else cfg.vocab_size
        if drafter_vocab != target_vocab_size:
            raise ValueError(f"{folder}: drafter vocabulary {drafter_vocab} != the target's {target_vocab_size}")
        return cls(model)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = [Draft([]) for _ in requests]
        live = [i for i, r in enumerate(requests) if r.k > 0 and r.hidden is not None and r.hidden.shape[0]]
        if not live:
            return drafts
        hidden = torch.cat([requests[i].hidden[-1:] for i in live]).to(self.device, self.dtype)
        last = torch.tensor([requests[i].token_ids[-1] for i in live], dtype=torch.long, device=self.device)
        k = min(self.model.n_predict, max(requests[i].k for i in live))
        chain = self.model.propose_chain(hidden, last, k)
        tokens, lengths = chain.tokens.tolist(), chain.lengths.tolist()
        for row, i in enumerate(live):
            drafts[i].tokens = tokens[row][: min(requests[i].k, lengths[row])]
        return drafts

    def propose_trees(self, requests: list[DraftRequest], n: int) -> list[TokenTree]:
        live = [i for i, r in enumerate(requests) if r.k > 0 and r.hidden is not None and r.hidden.shape[0]]
        paths: list[list[list[int]]] = [[] for _ in requests]
        if live:
            hidden = torch.cat([requests[i].hidden[-1:] for i in live]).to(self.device, self.dtype)
            last = torch.tensor([requests[i].token_ids[-1] for i in live], dtype=torch.long, device=self.device)
            k = min(self.model.n_predict, max(requests[i].k for i in live))
            tree = self.model.propose_tree(hidden, last, self._widths(k, n), n)
            found = tree.paths.tolist()
            for row, i in enumerate(live):
                paths[i] = found[row]
        return [tree_of_paths(r, p) for r, p in zip(requests, paths)]

    def _widths(self, k: int, n: int) -> list[int]:
        """Tokens kept per stage for the first k stages (see the module docstring)."""
        widths = list(self.model.config.top_k_tokens_per_head[:k])
        if max(widths) == 1:
            widths = [n, 2, *widths[2:]][:k]
        return widths
