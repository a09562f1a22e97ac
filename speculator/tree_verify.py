"""Lossless verification of a token tree (`speculator.token_tree.TokenTree`) in one target forward.

The target scores every node: p[i] is its (processed) distribution of the token after node i, from the forward
in which node i saw only its ancestors. Verification walks down from the root and emits the accepted path's
tokens plus one more token from the target, 1 to depth + 1 tokens in all.

Greedy: at each node follow the child whose token is the target's argmax there; where no child matches, emit
the argmax (at a leaf it is the bonus token). This is the longest root-to-node path whose every token equals
the target's argmax at its parent.

Sampling: recursive rejection sampling over siblings (SpecInfer, Miao et al. 2023, "multi-step speculative
sampling"). At node u start with the residual r = p[u]; try u's children c_1, c_2, ... in order: child c with
token x, drawn from q_c, is accepted with probability min(1, r(x) / q_c(x)) and verification moves to c; on its
rejection r becomes normalize(max(r - q_c, 0)) and the next sibling is tried. When every child is rejected (or u
is a leaf) one token is drawn from r and verification stops. The emitted token at u is distributed exactly as
p[u]: for one child, P(emit y) = min(r(y), q(y)) + (1 - sum_x min(r(x), q(x))) r'(y) = r(y) as in
`speculator.verify`; by induction over the siblings (each tried against the residual the earlier ones left) it
holds for any number. This needs the siblings' tokens drawn independently given the context: either each from
its own q_c (sampling with replacement), or, with q = None, fixed candidates (point masses q_c = delta_x: top-k
tokens, n-gram continuations), which are accepted with probability r(x), after which x is zeroed in r. With a
single chain this is `speculator.verify.verify_sampled`, draw for draw: one uniform per usable node in node
order, then one sample.

Like `verify_sampled`, a node whose q row cannot explain its token (no mass, or q(x) = 0) is dropped with its
subtree; entries of p or q that are not finite non-negative numbers carry no probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speculator.token_tree import TokenTree
from speculator.verify import _mass, sample

__all__ = ["TreeVerdict", "verify_tree_greedy", "verify_tree_sampled"]


@dataclass(frozen=True)
class TreeVerdict:
    """`tokens` to emit; `path` the accepted nodes root first, one per emitted token (its K/V moves to the
    sequence's slot context + depth, `model.kv_pages.SlotMove`)."""

    tokens: list[int]
    path: list[int]


def verify_tree_greedy(tree: TokenTree, target_argmax: Sequence[int]) -> TreeVerdict:
    """`target_argmax[i]`: the target's token after node i, one per node."""
    if len(target_argmax) != len(tree):
        raise ValueError(f"need {len(tree)} target tokens, one per node, got {len(target_argmax)}")
    path = [0]
    while True:
        want = int(target_argmax[path[-1]])
        nxt = next((c for c in tree.children[path[-1]] if tree.tokens[c] == want), None)
        if nxt is None:
            return TreeVerdict(tree.path_tokens(path[1:]) + [want], path)
        path.append(nxt)


def verify_tree_sampled(
    tree: TokenTree, p: torch.Tensor, q: torch.Tensor | None, generator: torch.Generator | None
) -> TreeVerdict:
    """Recursive rejection sampling of `tree` against the target probabilities `p` [n, V] (row i after node i);
    `q` [n, V]: row i the distribution node i's token was drawn from (row 0 unused), or None for fixed
    candidates."""
    n = len(tree)
    if p.dim() != 2 or p.shape[0] != n:
        raise ValueError(f"p must be [nodes={n}, V], got {tuple(p.shape)}")
    if q is not None and (q.dim() != 2 or q.shape[0] != n or q.shape[1] != p.shape[1]):
        raise ValueError(f"q must be [nodes={n}, V={p.shape[1]}], got {tuple(q.shape)}")
    p = _mass(p)
    usable = [True] * n
    if q is not None:
        q = _mass(q).double()
        q = q / q.sum(-1, keepdim=True)  # a row without mass becomes NaN: its node is dropped
        qx = q[torch.arange(n), torch.tensor(tree.tokens)].tolist()
        for i in range(1, n):
            usable[i] = usable[tree.parents[i]] and qx[i] > 0 and qx[i] != float("inf")
    order = [i for i in range(1, n) if usable[i]]
    u = dict(zip(order, torch.rand(len(order), generator=generator, dtype=torch.float64).tolist())) if order else {}

    path = [0]
    while True:
        node = path[-1]
        current = p[node]  # the residual the next sibling is tested against, normalised
        residual = None  # the last residual unnormalised (what a single chain samples from)
        for child in (c for c in tree.children[node] if usable[c]):
            x = tree.tokens[child]
            if residual is not None:
                total = float(residual.sum())
                current = residual / total if total > 0 else p[node]
            ratio = float(current[x]) / (qx[child] if q is not None else 1.0)
            # Strict "<": with u ~ U[0, 1), P(u < r) = min(r, 1), and a token with r(x) = 0 is never accepted.
            if u[child] < ratio:
                path.append(child)
                break
            if q is None:
                residual = current.clone()
                residual[x] = 0
            else:
                residual = (current.double() - q[child]).clamp_min(0)
        else:
            if residual is not None and not float(residual.sum()) > 0:  # only through float error
                residual = p[node]
            last = sample(p[node] if residual is None else residual, generator)
            return TreeVerdict(tree.path_tokens(path[1:]) + [last], path)
