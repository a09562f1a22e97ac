"""Token trees and their verification: trie building and top-k pruning, greedy path choice, recursive rejection
sampling over siblings (draw for draw `verify_sampled` on a chain; the target's distribution on bushy trees).

The statistical checks follow tests/test_verify.py: Pearson's chi-square at ALPHA per check, fixed seeds. The
target is a Markov chain over a small vocabulary (the distribution after a token depends on that token only),
so every emitted position can be checked against the target's distribution after the token before it.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from speculator.token_tree import TokenTree
from speculator.tree_verify import verify_tree_greedy, verify_tree_sampled
from speculator.verify import verify_greedy, verify_sampled
from tests.test_verify import ALPHA, chisquare_pvalue

V = 6
TRIALS = 10_000
MIN_SAMPLES = 400  # check a conditional distribution only when this many trials reached it
SHAPE = [-1, 0, 0, 0, 1, 1, 2, 4]  # root with 3 children, a second level of 3, one node at depth 3

# --------------------------------------------------------------------------------------------- building


def test_from_paths_merges_shared_prefixes_in_order():
    tree = TokenTree.from_paths(9, [[1, 2, 3], [1, 2, 4], [5], [1, 6]])
    assert tree.tokens == (9, 1, 2, 3, 4, 5, 6) and tree.parents == (-1, 0, 1, 2, 2, 0, 1)
    assert tree.depths.tolist() == [0, 1, 2, 3, 3, 1, 2]
    assert tree.children[0] == (1, 5) and tree.children[2] == (3, 4)
    assert tree.paths() == [[0, 1, 2, 3], [0, 1, 2, 4], [0, 5], [0, 1, 6]]
    assert not tree.is_chain and TokenTree.from_paths(9, [[1, 2], [1]]).is_chain
    assert TokenTree.from_paths(9, [[1, 2, 3], [4, 5]], max_nodes=5).tokens == (9, 1, 2, 3, 4)
    assert TokenTree.chain(9, [1, 2]) == TokenTree.from_paths(9, [[1, 2]])
    with pytest.raises(ValueError):
        TokenTree((1, 2), (-1, 1))


def test_from_top_tokens_keeps_the_most_probable_paths():
    rng = np.random.default_rng(0)
    top_k = [3, 2, 2]
    tokens = [rng.permutation(20)[:4].tolist() for _ in top_k]
    logprobs = [sorted(np.log(rng.dirichlet(np.ones(4))).tolist(), reverse=True) for _ in top_k]
    tree = TokenTree.from_top_tokens(0, tokens, logprobs, top_k, n_candidates=5)
    every = sorted(
        itertools.product(*[list(zip(lp[:k], t[:k])) for t, lp, k in zip(tokens, logprobs, top_k)]),
        key=lambda c: -sum(s for s, _ in c),
    )
    best = [[t for _, t in c] for c in every[:5]]
    assert [tree.path_tokens(p[1:]) for p in tree.paths()] == best
    assert len(tree) == 1 + len({tuple(b[:i]) for b in best for i in range(1, 4)})  # shared prefixes merged
    assert tree.path_tokens(tree.paths()[0][1:]) == [t[0] for t in tokens]  # the best path first


# ------------------------------------------------------------------------------------------------ greedy


def test_greedy_follows_the_target_down_the_matching_branch():
    tree = TokenTree((7, 1, 2, 3, 4, 5, 6, 8), tuple(SHAPE))  # node i > 0 carries token i, node 7 token 8
    argmax = [2, 0, 6, 0, 0, 0, 9, 0]  # root -> node 2 (token 2) -> node 6 (token 6), then 9
    assert verify_tree_greedy(tree, argmax).tokens == [2, 6, 9]
    assert verify_tree_greedy(tree, argmax).path == [0, 2, 6]
    assert verify_tree_greedy(tree, [1, 4, 0, 0, 8, 0, 0, 3]).tokens == [1, 4, 8, 3]  # bonus at the leaf
    assert verify_tree_greedy(tree, [9, 4, 0, 0, 8, 0, 0, 3]).tokens == [9]
    with pytest.raises(ValueError):
        verify_tree_greedy(tree, [1, 2])


def test_greedy_on_a_chain_is_verify_greedy():
    rng = np.random.default_rng(1)
    for _ in range(200):
        k = int(rng.integers(0, 5))
        draft, target = rng.integers(0, 3, k).tolist(), rng.integers(0, 3, k + 1).tolist()
        verdict = verify_tree_greedy(TokenTree.chain(5, draft), target)
        assert verdict.tokens == verify_greedy(target, draft) and len(verdict.path) == len(verdict.tokens)


# ----------------------------------------------------------------------------------------------- sampled


@pytest.mark.parametrize("drafter", ["stochastic", "point_mass", "broken_q"])
def test_sampled_on_a_chain_is_verify_sampled_draw_for_draw(drafter):
    g = torch.Generator().manual_seed(3)
    for trial in range(300):
        k = int(torch.randint(0, 5, (1,), generator=g))
        p = torch.softmax(2 * torch.randn(k + 1, V, generator=g), -1)
        q = torch.softmax(2 * torch.randn(k, V, generator=g), -1)
        draft = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(k)]
        if drafter == "broken_q" and k:
            q[int(torch.randint(0, k, (1,), generator=g)), :] = 0  # a row without mass ends the draft there
        q_rows = None if drafter == "point_mass" else torch.cat([torch.zeros(1, V), q])
        want = verify_sampled(p, draft, None if q_rows is None else q, torch.Generator().manual_seed(trial))
        got = verify_tree_sampled(TokenTree.chain(0, draft), p, q_rows, torch.Generator().manual_seed(trial))
        assert got.tokens == want and len(got.path) == len(want)


def _markov(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(distribution after the root [V], distribution after token x [V, V])."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(1.5 * torch.randn(V, generator=g), -1), torch.softmax(1.5 * torch.randn(V, V, generator=g), -1)


P0, P = _markov(1)
Q0, Q = _markov(2)  # the drafter's own Markov chain: close to nothing in particular


def _draw_tree(drafter: str, g: torch.Generator) -> tuple[TokenTree, torch.Tensor | None]:
    """SHAPE with tokens: each node's children drawn independently from the drafter's distribution after it
    ("stochastic", with q) or distinct candidates drawn from it and handed over as fixed ("point_mass")."""
    tokens, q_rows = [0], [torch.zeros(V)]
    for i in range(1, len(SHAPE)):
        parent = SHAPE[i]
        dist = Q0 if parent == 0 else Q[tokens[parent]]
        q_rows.append(dist)
        if drafter == "point_mass":  # distinct candidates: the siblings' tokens are not drawn again
            dist = dist.clone()
            dist[[tokens[s] for s in range(1, i) if SHAPE[s] == parent]] = 0
        tokens.append(int(torch.multinomial(dist, 1, generator=g)))
    return TokenTree(tuple(tokens), tuple(SHAPE)), (torch.stack(q_rows) if drafter == "stochastic" else None)


@functools.cache
def _emitted(drafter: str) -> list[list[int]]:
    g, out = torch.Generator().manual_seed(10), []
    for _ in range(TRIALS):
        tree, q = _draw_tree(drafter, g)
        p = torch.stack([P0] + [P[t] for t in tree.tokens[1:]])  # the target after each node's token
        verdict = verify_tree_sampled(tree, p, q, g)
        assert verdict.tokens[:-1] == tree.path_tokens(verdict.path[1:])
        out.append(verdict.tokens)
    return out


@pytest.mark.parametrize("drafter", ["stochastic", "point_mass"])
def test_sampled_tree_keeps_the_target_distribution(drafter):
    """The first emitted token follows the target after the root; every later one the target after the token
    before it. Deeper positions are reached: the tree is accepted beyond its first level."""
    emitted = _emitted(drafter)
    assert chisquare_pvalue(np.array([e[0] for e in emitted]), P0.double().numpy()) > ALPHA
    checked = 0
    for x in range(V):
        after = np.array([e[j + 1] for e in emitted for j in range(len(e) - 1) if e[j] == x])
        if len(after) >= MIN_SAMPLES:
            pval = chisquare_pvalue(after, P[x].double().numpy())
            assert pval > ALPHA, f"after token {x}: p-value {pval:.2e}"
            checked += 1
    assert checked >= 3
    lengths = np.bincount([len(e) for e in emitted], minlength=5)
    assert lengths[3] + lengths[4] > TRIALS // 50, lengths


def test_a_wrong_draft_distribution_fails_the_check():
    """Power: drafts drawn from Q but verified as if drawn uniformly are far from the target."""
    g = torch.Generator().manual_seed(5)
    first = []
    for _ in range(TRIALS // 2):
        tree, q = _draw_tree("stochastic", g)
        p = torch.stack([P0] + [P[t] for t in tree.tokens[1:]])
        first.append(verify_tree_sampled(tree, p, torch.full_like(q, 1 / V), g).tokens[0])
    assert chisquare_pvalue(np.array(first), P0.double().numpy()) < ALPHA


def test_siblings_are_tried_in_order_against_the_residual():
    """Fixed candidates under a point-mass target: the child with the target's token is always the one kept,
    whichever sibling it is, and an impossible candidate never is."""
    tree = TokenTree.from_paths(0, [[1], [2], [3, 4]])
    p = torch.zeros(len(tree), V)
    p[0, 3], p[1:, 5] = 1.0, 1.0
    for seed in range(20):
        verdict = verify_tree_sampled(tree, p, None, torch.Generator().manual_seed(seed))
        assert verdict.tokens == [3, 5] and verdict.path == [0, 3]
