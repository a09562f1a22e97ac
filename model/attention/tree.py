"""Token trees as the attention backends see them: a parent index per new row of one sequence.

A sequence verifying a tree feeds its nodes as new rows in tree order (`parents[i] < i`, `parents[0] = -1` for
the root, the token whose K/V is not cached yet). Node i writes its K/V into the sequence's lookahead slot
`context + i` and is rotated at position `context + depth(i)`; its attention row sees the whole cached context
and its own ancestors (itself included), never a sibling's branch. A chain is `parents = [-1, 0, 1, ...]`, which
is the causal mask verification used before trees. No page is copied or duplicated per candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_TREE_NODES = 64  # the C++ kernel keeps a row's view of the tree in one 64-bit mask


def check_parents(parents: Sequence[int]) -> np.ndarray:
    """`parents` as int64, validated: a single root at 0 and every other node after its parent."""
    p = np.asarray(parents, dtype=np.int64)
    if p.ndim != 1 or len(p) == 0:
        raise ValueError("a tree has at least its root")
    if len(p) > MAX_TREE_NODES:
        raise ValueError(f"a tree has at most {MAX_TREE_NODES} nodes, got {len(p)}")
    if p[0] != -1 or (p[1:] < 0).any() or (p[1:] >= np.arange(1, len(p))).any():
        raise ValueError(f"parents must be -1 for node 0 and lower than the node's own index after it: {p.tolist()}")
    return p


def tree_depths(parents: Sequence[int]) -> np.ndarray:
    """Depth of every node (root 0): its RoPE position is `context + depth`."""
    p = check_parents(parents)
    depth = np.zeros(len(p), dtype=np.int64)
    for i in range(1, len(p)):
        depth[i] = depth[p[i]] + 1
    return depth


def ancestor_matrix(parents: Sequence[int]) -> np.ndarray:
    """[n, n] bool: `A[i, j]` when node j is node i or one of its ancestors (the keys row i sees in the tree)."""
    p = check_parents(parents)
    a = np.eye(len(p), dtype=bool)
    for i in range(1, len(p)):
        a[i] |= a[p[i]]
    return a


def is_chain(parents: Sequence[int]) -> bool:
    p = np.asarray(parents)
    return bool((p == np.arange(-1, len(p) - 1)).all())


def row_masks(parents: Sequence[int]) -> np.ndarray:
    """Per node, as int64 bits, which of the 64 keys up to its own slot it sees: bit b stands for the key b
    slots before its own (b = 0: itself); the bits past the root stand for cached context, always set."""
    a = ancestor_matrix(parents)
    full = (1 << 64) - 1
    masks = []
    for i in range(len(a)):
        bits = (full << (i + 1)) & full  # b > i: cached context
        for j in np.flatnonzero(a[i]):
            bits |= 1 << (i - int(j))
        masks.append(bits)
    return np.array(masks, dtype=np.uint64).view(np.int64)
