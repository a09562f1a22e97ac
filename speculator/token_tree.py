"""Token trees: several candidate continuations of one sequence, verified together in one target forward.

Node 0 is the root: the sequence's last sampled token, whose K/V is not cached yet (what a chain's verification
feeds first). Every other node is a proposed token whose parent comes before it (`parents[i] < i`); a root-to-leaf
path is one candidate continuation, and candidates sharing a prefix share its nodes. The runner feeds the nodes in
this order (`StepInput.tree_parents`): node i takes lookahead slot context + i and RoPE position context + depth(i)
(`model.attention.tree`), so no cache page is copied per candidate.

Two builders: `from_paths` merges candidate chains into a trie (several n-gram matches, or a learned drafter's
ranked candidates), and `from_top_tokens` takes each position's top tokens with their log-probabilities and keeps
the `n_candidates` most probable paths, as IBM's MLP speculator does with `top_k_tokens_per_head`.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from model.attention.tree import MAX_TREE_NODES, ancestor_matrix, check_parents, is_chain, tree_depths


@dataclass(frozen=True)
class TokenTree:
    """`tokens[i]` at node i, `parents[i]` its parent (-1 for the root); siblings in order of preference."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"{len(self.tokens)} tokens for {len(self.parents)} parents")
        check_parents(self.parents)

    @classmethod
    def chain(cls, root: int, draft: Sequence[int]) -> TokenTree:
        return cls((root, *draft), tuple(range(-1, len(draft))))

    @classmethod
    def from_paths(cls, root: int, paths: Sequence[Sequence[int]], max_nodes: int = MAX_TREE_NODES) -> TokenTree:
        """The trie of `paths` (each a continuation after `root`), in the order given: an earlier path's nodes
        come first and its branch is tried first. Paths that would grow the tree past `max_nodes` are cut."""
        tokens, parents = [root], [-1]
        child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for path in paths:
            node = 0
            for token in path:
                nxt = child.get((node, int(token)))
                if nxt is None:
                    if len(tokens) >= max_nodes:
                        break
                    nxt = child[(node, int(token))] = len(tokens)
                    tokens.append(int(token))
                    parents.append(node)
                node = nxt
        return cls(tuple(tokens), tuple(parents))

    @classmethod
    def from_top_tokens(
        cls,
        root: int,
        top_tokens: Sequence[Sequence[int]],
        logprobs: Sequence[Sequence[float]],
        top_k_per_position: Sequence[int],
        n_candidates: int,
    ) -> TokenTree:
        """Position j proposes its first `top_k_per_position[j]` tokens (`top_tokens[j]`, log-probabilities
        `logprobs[j]`, best first); of every combination the `n_candidates` with the highest summed
        log-probability are kept, best first, and merged. A beam of `n_candidates` is exact here: a prefix
        outside the best n_candidates prefixes cannot start one of the best n_candidates paths."""
        if not len(top_tokens) == len(logprobs) == len(top_k_per_position):
            raise ValueError("one token list, log-probability list and top-k per position")
        if n_candidates < 1:
            raise ValueError("n_candidates must be at least 1")
        beam: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
        for tokens, scores, k in zip(top_tokens, logprobs, top_k_per_position):
            options = list(zip(scores[:k], tokens[:k]))
            grown = ((score + s, path + (int(t),)) for score, path in beam for s, t in options)
            beam = heapq.nlargest(n_candidates, grown, key=lambda c: c[0])
        return cls.from_paths(root, [path for _, path in beam])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return is_chain(self.parents)

    @cached_property
    def depths(self) -> np.ndarray:
        """Depth per node (root 0): node i is rotated at position context + depth(i)."""
        return tree_depths(self.parents)

    @cached_property
    def ancestors(self) -> np.ndarray:
        """[n, n] bool: node j is node i or an ancestor of it, i.e. row i's attention sees node j."""
        return ancestor_matrix(self.parents)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """Each node's children, in node order (the order of preference)."""
        out: list[list[int]] = [[] for _ in self.tokens]
        for i, p in enumerate(self.parents[1:], 1):
            out[p].append(i)
        return tuple(tuple(c) for c in out)

    def paths(self) -> list[list[int]]:
        """Every root-to-leaf path as node indices, root included."""
        leaves = [i for i, c in enumerate(self.children) if not c]
        return [[int(j) for j in np.flatnonzero(self.ancestors[leaf])] for leaf in leaves]

    def path_tokens(self, nodes: Sequence[int]) -> list[int]:
        return [self.tokens[i] for i in nodes]
