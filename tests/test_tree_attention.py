"""Token-tree attention against a dense masked reference (both backends), and compaction of the accepted path
on the default model: after the move its K/V equal those of a plain chain forward of the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.attention.cpu import CpuPagedAttention
from model.attention.paged import TorchPagedAttention
from model.attention.tree import ancestor_matrix, check_parents, row_masks, tree_depths
from model.kv_pages import KVPages, SlotMove, path_slots
from model.loader import load_arch
from model.runner import ModelRunner, StepInput
from speculator.token_tree import TokenTree
from speculator.tree_verify import verify_tree_greedy


def backend_of(name: str, block_size: int, cpu_kernels) -> TorchPagedAttention:
    if name == "torch":
        return TorchPagedAttention(block_size, torch.device("cpu"))
    return CpuPagedAttention(block_size, torch.device("cpu"), cpu_kernels)


def random_parents(n: int, rng: np.random.Generator) -> list[int]:
    """A random tree of n nodes in tree order, bushy or deep."""
    return [-1] + [int(rng.integers(max(0, i - 3), i)) for i in range(1, n)]


def dense_reference(q, k, v, scale, n_ctx, visible_new):
    """q [n, Hq, D]; k, v [n_ctx + n, Hkv, D]; row i sees the context and the new keys where visible_new[i]."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    mask = torch.cat([torch.ones(q.shape[0], n_ctx, dtype=torch.bool), torch.from_numpy(visible_new)], 1)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


def test_tree_helpers():
    parents = [-1, 0, 0, 1, 1, 2, 5]
    assert tree_depths(parents).tolist() == [0, 1, 1, 2, 2, 2, 3]
    a = ancestor_matrix(parents)
    assert np.flatnonzero(a[6]).tolist() == [0, 2, 5, 6] and not a[3, 2] and not a[2, 1]
    masks = row_masks(parents).view(np.uint64)
    for i in range(len(parents)):  # bit b: the key b slots before the row's own; older keys are the context
        bits = [(int(masks[i]) >> b) & 1 for b in range(64)]
        assert bits[: i + 1] == [int(a[i, i - b]) for b in range(i + 1)] and all(bits[i + 1 :])
    assert (row_masks(list(range(-1, 9))) == -1).all()  # a chain hides nothing
    for bad in ([0], [-1, 1], [-1, 0, 2], [-1, -1], [-1] + list(range(64))):
        with pytest.raises(ValueError):
            check_parents(bad)


@pytest.mark.parametrize("d", [8, 64])
@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_tree_attention_matches_dense_reference(name, d, cpu_kernels):
    """Random trees after contexts of many block sizes (nodes across block boundaries, a 64-node tree, a long
    context the kernel splits into slices), beside chains, a decode and a prompt in the same step; GQA; two
    tree sequences on the same prefix-cached blocks."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    bs, hq, hkv, nb = 4, 6, 2, 160
    backend = backend_of(name, bs, cpu_kernels)
    k_cache, v_cache = torch.zeros(nb, bs, hkv, d), torch.zeros(nb, bs, hkv, d)
    free = [int(b) for b in rng.permutation(np.arange(1, nb))]
    shared = [free.pop() for _ in range(3)]  # a 12-token cached prefix two sequences share
    shared_k, shared_v = torch.randn(12, hkv, d), torch.randn(12, hkv, d)
    for pos in range(12):
        k_cache[shared[pos // bs], pos % bs], v_cache[shared[pos // bs], pos % bs] = shared_k[pos], shared_v[pos]
    # (context, tree parents or None for causal rows, new tokens, shares the prefix)
    cases = [
        (7, random_parents(9, rng), 9, False),
        (12, random_parents(6, rng), 6, True),
        (13, [-1, 0, 0, 0, 1, 2, 3], 7, True),
        (9, None, 1, False),  # a decode
        (10, None, 7, False),  # a chain attended beside the 7-node tree (same length, same context bucket)
        (0, None, 6, False),  # a prompt
        (30, random_parents(64, rng), 64, False),
        (200, random_parents(20, rng), 20, False),
        (3, [-1], 1, False),  # a tree that is only its root
    ]
    seqs = []
    for n_ctx, parents, n_new, share in cases:
        total = n_ctx + n_new
        table = shared[:] if share else []
        table += [free.pop() for _ in range(-(-total // bs) - len(table))]
        k_all, v_all = torch.randn(total, hkv, d), torch.randn(total, hkv, d)
        if share:
            k_all[:12], v_all[:12] = shared_k, shared_v
        for pos in range(12 if share else 0, n_ctx):
            k_cache[table[pos // bs], pos % bs], v_cache[table[pos // bs], pos % bs] = k_all[pos], v_all[pos]
        visible = ancestor_matrix(parents) if parents is not None else np.tril(np.ones((n_new, n_new), dtype=bool))
        seqs.append((n_ctx, n_new, table, parents, visible, k_all, v_all, torch.randn(n_new, hq, d)))
    slots = np.concatenate([[t[p // bs] * bs + p % bs for p in range(c, c + n)] for c, n, t, *_ in seqs])
    before_shared = k_cache[shared].clone()
    meta = backend.prepare(
        [s[1] for s in seqs], [s[0] + s[1] for s in seqs], [s[2] for s in seqs], slots, [s[3] for s in seqs]
    )
    q = torch.cat([s[7] for s in seqs])
    k_new = torch.cat([s[5][s[0] :] for s in seqs])
    v_new = torch.cat([s[6][s[0] :] for s in seqs])
    out = backend.forward(q, k_new, v_new, k_cache, v_cache, meta, scale=d**-0.5)
    start = 0
    for n_ctx, n_new, _, _, visible, k_all, v_all, qs in seqs:
        ref = dense_reference(qs, k_all, v_all, d**-0.5, n_ctx, visible)
        torch.testing.assert_close(out[start : start + n_new], ref, atol=1e-5, rtol=1e-4)
        start += n_new
    # node K/V went to the sequences' own lookahead slots; the shared prefix pages are untouched
    torch.testing.assert_close(k_cache.view(-1, hkv, d)[torch.from_numpy(slots)], k_new)
    assert torch.equal(k_cache[shared], before_shared)


def test_move_slots_reads_every_source_before_writing():
    kv = KVPages(2, 6, 4, 1, 2, torch.float32, torch.device("cpu"))
    kv.data.copy_(torch.randn_like(kv.data))
    before = kv.data.clone()
    # a path 0 -> 2 -> 3 -> 6 at start 5 over blocks [3, 1, 4]: nodes at positions 7, 8, 11 move to 6, 7, 8,
    # onto slots the path's own later nodes leave; a root-only path moves nothing
    src, dst = path_slots([SlotMove([3, 1, 4], 5, [0, 2, 3, 6]), SlotMove([2], 0, [0])], 4)
    assert src.tolist() == [1 * 4 + 3, 4 * 4 + 0, 4 * 4 + 3] and dst.tolist() == [1 * 4 + 2, 1 * 4 + 3, 4 * 4 + 0]
    kv.move_slots(src, dst)
    flat, old = kv.data.view(2, 2, -1, 1, 2), before.view(2, 2, -1, 1, 2)
    torch.testing.assert_close(flat[:, :, dst], old[:, :, src])
    untouched = np.setdiff1d(np.arange(24), dst)
    assert torch.equal(flat[:, :, untouched], old[:, :, untouched])


@pytest.fixture(scope="module", params=["torch", "cpu"])
def runner(request, model_folder):
    return ModelRunner(
        model_folder,
        load_arch(model_folder),
        dtype=torch.float32,
        device=torch.device("cpu"),
        block_size=16,
        kv_cache_bytes=32 << 20,
        max_model_len=512,
        attention_backend=request.param,
    )


def test_compacted_tree_path_equals_a_chain_forward(runner, tokenizer):
    """Prompt, then a tree whose accepted path crosses a block boundary: the tree's logits on the path equal a
    chain's, and after compaction the pool holds, at context .. context + depth, the chain forward's K/V."""
    ids = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n")["input_ids"][:13]
    n_ctx = len(ids) - 1  # 12: the accepted path's positions 12..17 cross into the second block
    bs = runner.block_size
    tree_table, chain_table = list(range(1, 5)), list(range(5, 9))
    for table in (tree_table, chain_table):
        runner.execute([StepInput(ids[:-1], 0, table, 1)])
    root = ids[-1]
    parents = [-1, 0, 0, 1, 1, 2, 4, 3, 6, 8, 6]
    tokens = [root, 198, 262, 284, 293, 220, 327, 11, 309, 30, 25]
    path = [0, 1, 4, 6, 8, 9]  # depth 5, nodes spread over the tree's slots
    assert all(parents[path[i + 1]] == path[i] for i in range(len(path) - 1))
    tree_logits = runner.execute([StepInput(tokens, n_ctx, tree_table, len(tokens), tree_parents=parents)])
    runner.move_slots([SlotMove(tree_table, n_ctx, path)])
    chain = [tokens[i] for i in path]
    chain_logits = runner.execute([StepInput(chain, n_ctx, chain_table, len(chain))])
    torch.testing.assert_close(tree_logits[path], chain_logits, atol=2e-3, rtol=1e-3)
    assert (n_ctx + path[-1]) // bs != n_ctx // bs  # the path's slots span two blocks

    def slots(table, positions):
        return torch.tensor([table[p // bs] * bs + p % bs for p in positions])

    flat = runner.kv.data.view(*runner.kv.data.shape[:2], -1, *runner.kv.data.shape[4:])
    positions = range(n_ctx, n_ctx + len(path))
    torch.testing.assert_close(
        flat[:, :, slots(tree_table, positions)], flat[:, :, slots(chain_table, positions)], atol=1e-4, rtol=1e-4
    )
    # a decode step after the compacted path sees the same cache as after the chain
    nxt = int(chain_logits[-1].argmax())
    after_tree = runner.execute([StepInput([nxt], n_ctx + len(path), tree_table, 1)])
    after_chain = runner.execute([StepInput([nxt], n_ctx + len(path), chain_table, 1)])
    torch.testing.assert_close(after_tree, after_chain, atol=2e-3, rtol=1e-3)


def test_greedy_tree_verification_emits_plain_greedy_tokens(runner, tokenizer):
    """One tree forward over wrong and right candidates, verified greedily, emits what plain decoding does; the
    right candidate is neither the first branch nor a whole path of its own."""
    ids = tokenizer("def add(a, b):\n    return")["input_ids"]
    table, plain_table = list(range(9, 13)), list(range(13, 17))
    runner.execute([StepInput(ids[:-1], 0, table, 1)])
    plain = [int(runner.execute([StepInput(ids, 0, plain_table, 1)])[0].argmax())]
    for _ in range(4):
        step = StepInput([plain[-1]], len(ids) + len(plain) - 1, plain_table, 1)
        plain.append(int(runner.execute([step])[0].argmax()))
    wrong = (plain[0] + 1) % 1000
    tree = TokenTree.from_paths(ids[-1], [[wrong, plain[1]], plain[:2] + [wrong], plain[:4], [plain[0], wrong]])
    logits = runner.execute(
        [StepInput(list(tree.tokens), len(ids) - 1, table, len(tree), tree_parents=list(tree.parents))]
    )
    verdict = verify_tree_greedy(tree, logits.argmax(-1).tolist())
    assert verdict.tokens == plain[:5] and tree.path_tokens(verdict.path[1:]) == plain[:4]
