"""Prompt-lookup (n-gram) proposer: copy what followed the latest earlier occurrence of the context's suffix.

Per sequence an index maps every n-gram (n in [min_n, max_n]) to the end of its latest occurrence that has a
continuation; it is updated incrementally as tokens are accepted, so a proposal costs O(max_n + k).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from speculator.proposer import Draft, DraftRequest, Proposer, tree_of_paths
from speculator.token_tree import TokenTree


@dataclass
class _Index:
    last: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # n-grams ending before this position are in `last`


class NgramProposer(Proposer):
    def __init__(self, min_n: int = 1, max_n: int = 3):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._indexes: dict[int, _Index] = {}

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(self._propose_one(r)) if r.k > 0 else Draft([]) for r in requests]

    def propose_trees(self, requests: list[DraftRequest], n: int) -> list[TokenTree]:
        """Several matches: the continuations of the latest occurrence of each suffix length (longest first),
        distinct ones only, up to `n`, merged into a tree."""
        return [tree_of_paths(r, self._matches(r, n) if r.k > 0 else []) for r in requests]

    def _propose_one(self, r: DraftRequest) -> list[int]:
        matches = self._matches(r, 1)
        return matches[0] if matches else []

    def _matches(self, r: DraftRequest, n: int) -> list[list[int]]:
        toks = r.token_ids
        index = self._indexes.setdefault(r.seq_id, _Index())
        # Register n-grams ending at positions [indexed, len-1): each has a following token.
        for end in range(index.indexed, len(toks) - 1):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                index.last[tuple(toks[end - n + 1 : end + 1])] = end
        index.indexed = max(index.indexed, len(toks) - 1)
        found: list[list[int]] = []
        for size in range(min(self.max_n, len(toks)), self.min_n - 1, -1):
            end = index.last.get(tuple(toks[len(toks) - size :]))
            if end is not None:
                cont = toks[end + 1 : end + 1 + r.k]
                if cont not in found:
                    found.append(cont)
                    if len(found) == n:
                        break
        return found

    def release(self, seq_id: int) -> None:
        self._indexes.pop(seq_id, None)
