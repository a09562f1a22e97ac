"""Paged attention vs a dense reference: GQA, ragged batches, context + causal new tokens, any block order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.attention.backends import make_backend
from model.attention.cpu import CpuPagedAttention
from model.attention.paged import TorchPagedAttention


def backend_of(name: str, block_size: int, cpu_kernels) -> TorchPagedAttention:
    if name == "torch":
        return TorchPagedAttention(block_size, torch.device("cpu"))
    return CpuPagedAttention(block_size, torch.device("cpu"), cpu_kernels)


def dense_reference(q, k, v, scale, n_ctx):
    """q [n, Hq, D]; k, v [L, Hkv, D]; query i sees keys < n_ctx + i + 1."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    mask = torch.arange(k.shape[0])[None, :] <= (n_ctx + torch.arange(q.shape[0]))[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize("name", ["torch", "cpu"])
@pytest.mark.parametrize("split_chunk_min", [64, 2])
def test_paged_attention_matches_dense_reference(split_chunk_min, name, cpu_kernels):
    """With the default threshold short chunks take the masked (torch) or in-place (cpu kernel) path; with 2
    they take the split (LSE) path."""
    torch.manual_seed(0)
    bs, hq, hkv, d, nb = 4, 6, 2, 8, 40
    backend = backend_of(name, bs, cpu_kernels)
    backend.split_chunk_min = split_chunk_min
    k_cache = torch.zeros(nb, bs, hkv, d)
    v_cache = torch.zeros(nb, bs, hkv, d)
    rng = np.random.default_rng(0)
    free = list(rng.permutation(np.arange(1, nb)))  # scattered, out-of-order blocks
    # (cached context length, new tokens): a decode, a speculative verify, two whole prompts of one length,
    # a chunk after context, and a decode with a much longer context (another length bucket)
    shapes = [(9, 1), (5, 4), (0, 7), (12, 3), (0, 7), (30, 1)]
    seqs = []
    for n_ctx, n_new in shapes:
        total = n_ctx + n_new
        table = [int(free.pop()) for _ in range(-(-total // bs))]
        k_all, v_all = torch.randn(total, hkv, d), torch.randn(total, hkv, d)
        for pos in range(n_ctx):  # context already in the cache
            k_cache[table[pos // bs], pos % bs] = k_all[pos]
            v_cache[table[pos // bs], pos % bs] = v_all[pos]
        seqs.append((n_ctx, n_new, table, k_all, v_all, torch.randn(n_new, hq, d)))
    slots = np.concatenate([[t[p // bs] * bs + p % bs for p in range(c, c + n)] for c, n, t, *_ in seqs])
    meta = backend.prepare([n for _, n, *_ in seqs], [c + n for c, n, *_ in seqs], [s[2] for s in seqs], slots)
    q = torch.cat([s[5] for s in seqs])
    k_new = torch.cat([s[3][s[0] :] for s in seqs])
    v_new = torch.cat([s[4][s[0] :] for s in seqs])
    out = backend.forward(q, k_new, v_new, k_cache, v_cache, meta, scale=d**-0.5)
    chunk = "paged" if split_chunk_min > 4 else "chunk"
    expected = [("paged", 1, 1), ("paged", 1, 1), (chunk, 1, 3), (chunk, 1, 4), ("prompt", 2, 7)]
    if name == "cpu":  # every non-prompt, non-split row in one kernel call
        expected = (
            [("inplace", 4, 4), ("prompt", 2, 7)]
            if chunk == "paged"
            else [("inplace", 2, 1), ("chunk", 1, 3), ("chunk", 1, 4), ("prompt", 2, 7)]
        )
    assert sorted((g.kind, g.num_seqs, g.query_len) for g in meta.groups) == sorted(expected)
    start = 0
    for n_ctx, n_new, _, k_all, v_all, qs in seqs:
        ref = dense_reference(qs, k_all, v_all, d**-0.5, n_ctx)
        torch.testing.assert_close(out[start : start + n_new], ref, atol=1e-5, rtol=1e-4)
        start += n_new
    # the new K/V landed in the pool at their slots
    torch.testing.assert_close(k_cache.view(-1, hkv, d)[torch.from_numpy(slots)], k_new)


@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_uniform_batch_fast_path_matches(name, cpu_kernels):
    torch.manual_seed(1)
    bs, h, d = 2, 2, 4
    backend = backend_of(name, bs, cpu_kernels)
    kc, vc = torch.zeros(8, bs, h, d), torch.zeros(8, bs, h, d)
    tables = [[3, 1], [2, 5]]
    slots = np.array([3 * bs + 0, 2 * bs + 0])
    meta = backend.prepare([1, 1], [1, 1], tables, slots)
    assert len(meta.groups) == 1 and meta.groups[0].rows is None  # uniform: no gather of queries
    q, k, v = torch.randn(2, h, d), torch.randn(2, h, d), torch.randn(2, h, d)
    out = backend.forward(q, k, v, kc, vc, meta, scale=0.5)
    torch.testing.assert_close(out, v)  # a single visible key: attention returns its value


@pytest.mark.parametrize(("dtype", "d"), [(torch.float32, 64), (torch.bfloat16, 64), (torch.float32, 128)])
def test_cpu_kernel_long_contexts_and_dtypes(dtype, d, cpu_kernels):
    """Verification rows over contexts of many blocks, in both model dtypes and the head sizes with their own
    code path (64, 128; the dense-reference tests cover other sizes), against SDPA on gathered pages."""
    torch.manual_seed(2)
    bs, hq, hkv, nb = 16, 9, 3, 300
    k_cache, v_cache = torch.randn(nb, bs, hkv, d, dtype=dtype), torch.randn(nb, bs, hkv, d, dtype=dtype)
    lens, n_new = [1000, 37, 2500], [5, 1, 3]
    perm = torch.randperm(nb - 1) + 1
    tables, at = [], 0
    for n in lens:
        tables.append(perm[at : at + -(-n // bs)].tolist())
        at += len(tables[-1])
    q = torch.randn(sum(n_new), hq, d, dtype=dtype)
    new_kv = torch.zeros(sum(n_new), hkv, d, dtype=dtype)  # written to the null block: the pages stay as drawn
    outs = []
    for name in ("torch", "cpu"):
        backend = backend_of(name, bs, cpu_kernels)
        meta = backend.prepare(n_new, lens, tables, np.zeros(sum(n_new), dtype=np.int64))
        outs.append(backend.forward(q, new_kv, new_kv, k_cache, v_cache, meta, scale=0.125))
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(outs[1].float(), outs[0].float(), **tol)


def test_backend_choice(cpu_kernels):
    cpu = torch.device("cpu")
    assert isinstance(make_backend("cpu", 16, cpu, cpu_kernels), CpuPagedAttention)
    assert isinstance(make_backend("auto", 16, cpu, cpu_kernels), CpuPagedAttention)
    assert type(make_backend("auto", 16, cpu)) is TorchPagedAttention  # kernels unavailable: PyTorch
    assert type(make_backend("torch", 16, cpu, cpu_kernels)) is TorchPagedAttention
    with pytest.raises(ValueError, match="needs the built CPU kernels"):
        make_backend("cpu", 16, cpu)
    with pytest.raises(ValueError, match="unknown attention backend"):
        make_backend("flash", 16, cpu, cpu_kernels)
