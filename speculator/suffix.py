"""Suffix decoding proposer (SuffixDecoding, arXiv 2411.04975): continue the longest earlier match of the context's
suffix along its most frequent continuations.

Two depth-bounded suffix tries with counts: a local one per sequence over its prompt + output (dropped when the
sequence is released), and a global one over the outputs of recent requests, bounded by a token budget (the
oldest requests' contributions are removed first). A trie node is a string of at most `max_depth` tokens; its
`count` is how often the string occurs, its `total` how often it occurs followed by a token. Appending a token
touches at most `max_depth` nodes (the ends of the current suffixes), so updates are incremental and O(depth).

A proposal starts at the longest suffix of the context (length p) that occurred earlier with a continuation and
follows the most frequent child while the product of continuation frequencies stays >= `min_token_prob`, for at
most `floor(spec_factor * p + spec_offset)` tokens: long matches earn long drafts. The depth bound leaves a match
of length p room for `max_depth - p` tokens, so the longest match that leaves room for k is tried too. Of these
(in the local and the global trie) the path with the highest score (sum of path probabilities, the expected
accepted tokens) wins.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from speculator.proposer import Draft, DraftRequest, Proposer, tree_of_paths
from speculator.token_tree import TokenTree


class SuffixTrie:
    """Every substring of at most `max_depth` tokens of the inserted texts, with occurrence counts.

    Nodes are ids into flat lists (`count`, `total`, `kids`: token -> child id), the root is 0: dicts and lists
    of ints are not tracked by the garbage collector, which would otherwise walk every node of a large trie
    again and again. A text is inserted token by token through its list of active nodes (the ends of its current
    suffixes, root first); its first token is taken out with `remove_first`, pruning nodes whose count falls to
    zero (their ids are reused)."""

    root = 0

    def __init__(self, max_depth: int):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        self.max_depth = max_depth
        self.count = [0]  # occurrences of the node's string
        self.total = [0]  # occurrences followed by a token (= the sum of the children's counts)
        self.kids: list[dict[int, int] | None] = [None]
        self._free: list[int] = []
        self.num_nodes = 0  # the root not counted

    def start(self) -> list[int]:
        """The active nodes of an empty text."""
        return [0]

    def _new(self) -> int:
        self.num_nodes += 1
        if self._free:
            node = self._free.pop()
            self.count[node] = self.total[node] = 0
            self.kids[node] = None
            return node
        self.count.append(0)
        self.total.append(0)
        self.kids.append(None)
        return len(self.count) - 1

    def append(self, active: list[int], token: int) -> list[int]:
        """Add one token to the text whose active nodes are `active`; returns its new active nodes."""
        count, total, kids = self.count, self.total, self.kids
        new = [0]
        for node in active[: self.max_depth]:  # depths 0..max_depth-1 can grow by one
            children = kids[node]
            if children is None:
                children = kids[node] = {}
            child = children.get(token)
            if child is None:
                child = children[token] = self._new()
            count[child] += 1
            total[node] += 1
            new.append(child)
        return new

    def remove(self, tokens: list[int]) -> None:
        """Take out a text inserted with `append` (all of `tokens`, in order)."""
        for s in range(len(tokens)):
            self.remove_first(tokens[s : s + self.max_depth])

    def remove_first(self, path: list[int]) -> None:
        """Take out a text's first token: the path of its longest string starting there (`max_depth` tokens of
        the text at most); nodes no other string goes through are pruned."""
        count, total, kids = self.count, self.total, self.kids
        node = 0
        for t in path:
            child = kids[node][t]  # type: ignore[index]
            total[node] -= 1
            count[child] -= 1
            if count[child] == 0:
                # Only this path went through it: the rest of the path is a chain of count 1.
                del kids[node][t]  # type: ignore[union-attr]
                while child is not None:
                    self._free.append(child)
                    self.num_nodes -= 1
                    grand = kids[child]
                    kids[child] = None
                    child = next(iter(grand.values()), None) if grand else None
                return
            node = child

    def walk(self, path: list[int]) -> int:
        """The node of a string known to be in the trie."""
        node = 0
        for t in path:
            node = self.kids[node][t]  # type: ignore[index]
        return node

    def find(self, context: list[int]) -> tuple[int, int | None]:
        """The longest suffix of `context` (length p < max_depth) that occurs followed by a token: (p, node)."""
        kids, n = self.kids, len(context)
        for s in range(max(0, n - self.max_depth + 1), n):
            node: int | None = 0
            for t in context[s:]:
                children = kids[node]  # type: ignore[index]
                node = children.get(t) if children else None
                if node is None:
                    break
            if node is not None and self.total[node] > 0:
                return n - s, node
        return 0, None

    def best_path(self, node: int, budget: int, min_prob: float) -> _Path:
        """Follow the most frequent child while the path probability stays >= min_prob."""
        count, total, kids = self.count, self.total, self.kids
        tokens: list[int] = []
        prob, score = 1.0, 0.0
        while len(tokens) < budget and total[node] > 0:
            token, child = max(kids[node].items(), key=lambda kv: count[kv[1]])  # type: ignore[union-attr]
            prob *= count[child] / total[node]
            if prob < min_prob:
                break
            tokens.append(token)
            score += prob
            node = child
        return _Path(tokens, score)

    def candidate_paths(self, node: int, budget: int, min_prob: float, n: int) -> list[_Path]:
        """Best-first expansion by path probability (each node >= min_prob, depth <= budget, at most n * budget
        nodes); the root-to-leaf paths of the expanded tree, by score."""
        count, total, kids = self.count, self.total, self.kids
        heap: list[tuple[float, int, int, list[int], float]] = [(-1.0, 0, node, [], 0.0)]
        order = 1
        leaves: list[_Path] = []
        expanded = 0
        while heap and expanded <= n * budget:
            neg_prob, _, cur, path, score = heapq.heappop(heap)
            expanded += 1
            grew = False
            if len(path) < budget and total[cur] > 0:
                for token, child in kids[cur].items():  # type: ignore[union-attr]
                    prob = -neg_prob * count[child] / total[cur]
                    if prob >= min_prob:
                        heapq.heappush(heap, (-prob, order, child, [*path, token], score + prob))
                        order += 1
                        grew = True
            if not grew and path:
                leaves.append(_Path(path, score))
        leaves.extend(_Path(path, score) for _, _, _, path, score in heap)
        leaves.sort(key=lambda p: -p.score)
        return leaves


@dataclass
class _Path:
    tokens: list[int]
    score: float  # sum of the path probabilities: the expected accepted tokens


@dataclass
class _Contribution:
    """One request's outputs in the global trie; evicted from the front, token by token."""

    seq_id: int
    start: int  # index in its sequence of tokens[0]
    active: list[int]
    tokens: list[int] = field(default_factory=list)
    dropped: int = 0  # tokens[:dropped] are evicted

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def held(self) -> list[int]:
        return self.tokens[self.dropped :]


@dataclass
class _SeqState:
    active: list[int]  # the local trie's active nodes
    indexed: int = 0  # tokens of the sequence in the local trie
    global_next: int = 0  # index of the sequence's next token for the global trie


class SuffixProposer(Proposer):
    def __init__(
        self,
        max_depth: int = 24,
        spec_factor: float = 1.0,
        spec_offset: float = 0.0,
        min_token_prob: float = 0.1,
        global_budget: int = 16384,
    ):
        """`global_budget`: output tokens the global trie holds (0 = no global trie)."""
        if global_budget < 0 or spec_factor < 0 or not 0 <= min_token_prob <= 1:
            raise ValueError("need global_budget >= 0, spec_factor >= 0 and 0 <= min_token_prob <= 1")
        self.max_depth = max_depth
        self.spec_factor, self.spec_offset, self.min_token_prob = spec_factor, spec_offset, min_token_prob
        self.global_budget = global_budget
        self.global_trie = SuffixTrie(max_depth)
        self.global_tokens = 0
        self._fifo: deque[_Contribution] = deque()
        self._contributions: dict[int, _Contribution] = {}
        self._local: dict[int, SuffixTrie] = {}
        self._seqs: dict[int, _SeqState] = {}

    # ---- the Proposer interface -------------------------------------------------------------------------

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(self._candidates(r, 1)[0] if r.k > 0 else []) for r in requests]

    def propose_candidates(self, requests: list[DraftRequest], n: int) -> list[list[list[int]]]:
        """Up to n draft chains per request, best first: chain 0 is what `propose` gives, the others branch off
        the same source trie best-first by path probability (no chain is a prefix of another)."""
        return [self._candidates(r, n) if r.k > 0 else [[]] for r in requests]

    def propose_trees(self, requests: list[DraftRequest], n: int) -> list[TokenTree]:
        return [tree_of_paths(r, chains) for r, chains in zip(requests, self.propose_candidates(requests, n))]

    def release(self, seq_id: int) -> None:
        """Drop the sequence's local trie; its outputs stay in the global trie until evicted."""
        self._local.pop(seq_id, None)
        self._seqs.pop(seq_id, None)

    # ---- updates ----------------------------------------------------------------------------------------

    def _update(self, r: DraftRequest) -> _SeqState:
        toks = r.token_ids
        st = self._seqs.get(r.seq_id)
        if st is None or len(toks) < st.indexed:
            trie = self._local[r.seq_id] = SuffixTrie(self.max_depth)
            contrib = self._contributions.get(r.seq_id)
            # Outputs only: first seen at its first decode step, a sequence's last token is its first output.
            st = self._seqs[r.seq_id] = _SeqState(trie.start(), 0, contrib.end if contrib else max(0, len(toks) - 1))
        trie = self._local[r.seq_id]
        for t in toks[st.indexed :]:
            st.active = trie.append(st.active, t)
        st.indexed = len(toks)
        if self.global_budget:
            for i in range(st.global_next, len(toks)):
                self._add_global(r.seq_id, toks[i], i)
        st.global_next = len(toks)
        return st

    def _add_global(self, seq_id: int, token: int, index: int) -> None:
        contrib = self._contributions.get(seq_id)
        if contrib is None:
            contrib = self._contributions[seq_id] = _Contribution(seq_id, index, self.global_trie.start())
            self._fifo.append(contrib)
        contrib.active = self.global_trie.append(contrib.active, token)
        contrib.tokens.append(token)
        self.global_tokens += 1
        while self.global_tokens > self.global_budget:
            self._evict_one()

    def _evict_one(self) -> None:
        """Drop the oldest token of the global trie (the first held one of the oldest contribution)."""
        old = self._fifo[0]
        self.global_trie.remove_first(old.tokens[old.dropped : old.dropped + self.max_depth])
        old.dropped += 1
        self.global_tokens -= 1
        # Suffixes reaching back past the dropped token are no longer in the trie: they cannot grow.
        del old.active[len(old.tokens) - old.dropped + 1 :]
        if old.dropped == len(old.tokens):
            self._fifo.popleft()
            if self._contributions.get(old.seq_id) is old:
                del self._contributions[old.seq_id]
        elif old.dropped >= 1024 and 2 * old.dropped >= len(old.tokens):
            old.start += old.dropped
            del old.tokens[: old.dropped]
            old.dropped = 0

    # ---- proposals --------------------------------------------------------------------------------------

    def _budget(self, p: int, k: int) -> int:
        return max(0, min(k, self.max_depth - p, int(self.spec_factor * p + self.spec_offset)))

    def _sources(self, r: DraftRequest, st: _SeqState) -> list[tuple[SuffixTrie, int, int]]:
        """(trie, match length, node) to propose from: in each trie the longest match, and the longest one that
        leaves room for k tokens under the depth bound (any suffix of a match is a match)."""
        found = []
        local = self._local[r.seq_id]
        for p in range(len(st.active) - 1, 0, -1):  # the longest suffix seen before with a continuation
            if local.total[st.active[p]] > 0:
                found.append((local, p, st.active[p]))
                room = max(1, min(p, self.max_depth - r.k))
                if room < p:
                    found.append((local, room, st.active[room]))
                break
        if self.global_budget:
            context = r.token_ids[-(self.max_depth - 1) :]
            p, node = self.global_trie.find(context)
            if node is not None:
                found.append((self.global_trie, p, node))
                room = max(1, min(p, self.max_depth - r.k))
                if room < p:
                    found.append((self.global_trie, room, self.global_trie.walk(context[len(context) - room :])))
        return found

    def _candidates(self, r: DraftRequest, n: int) -> list[list[int]]:
        st = self._update(r)
        best: tuple[_Path, SuffixTrie, int, int] | None = None
        for trie, p, node in self._sources(r, st):
            budget = self._budget(p, r.k)
            path = trie.best_path(node, budget, self.min_token_prob)
            if path.tokens and (best is None or path.score > best[0].score):
                best = (path, trie, node, budget)
        if best is None:
            return [[]]
        first, trie, node, budget = best
        chains = [first.tokens]
        if n > 1:
            for path in trie.candidate_paths(node, budget, self.min_token_prob, n):
                if len(chains) == n:
                    break
                if not any(c[: len(path.tokens)] == path.tokens for c in chains):
                    chains.append(path.tokens)
        return chains
