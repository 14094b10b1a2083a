"""The compiled Triton kernels against their torch references on a CUDA device: all dtypes, full sizes.

Skipped without CUDA (the ``gpu`` marker); run on the H100 by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from test_kernels import _check_topk_close, _fp8_inputs, _small_ints
from topklab.indexers.exact import exact_topk
from topklab.kernels import (
    fp8_index_scores,
    fp8_index_scores_reference,
    sparse_decode_attention,
    sparse_decode_attention_reference,
    topk,
    topk_attention,
    topk_attention_reference,
    topk_reference,
)

pytestmark = pytest.mark.gpu
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def cuda_rng():
    return torch.Generator(device="cuda").manual_seed(4321)


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(8192, 1), (8192, 2048), (8192, 8192), (131089, 64), (131089, 2048),
                                 (131089, 8193)])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_topk_matches_reference(cuda_rng, dtype, n, k, per_kv_head):
    b, hq, hkv, d = 2, 32, 8, 128
    q, keys = _randn(cuda_rng, b, hq, d, dtype=dtype), _randn(cuda_rng, b, hkv, n, d, dtype=dtype)
    lengths = torch.tensor([n, max(1, n // 3 - 5)], device="cuda")
    got = topk(q, keys, k, lengths=lengths, per_kv_head=per_kv_head)
    ref = topk_reference(q, keys, k, lengths=lengths, per_kv_head=per_kv_head)
    _check_topk_close(got, ref, q, keys, lengths=lengths, per_kv_head=per_kv_head)


@pytest.mark.parametrize("n,k,cut_cap,wide_bins", [
    (524288, 32768, None, None),  # k = N/16 at 512K
    (131089, 2048, None, None),   # where one program per row is the default
    (131089, 8193, 64, 32),       # the cut's bin outgrows the cut buffer: the whole finalize
])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_topk_split_finalize_on_gpu(cuda_rng, monkeypatch, n, k, cut_cap, wide_bins, per_kv_head):
    """The finalize in parts (histogram and route kernels, many programs per row) at full size, and its fallback."""
    topk_module = importlib.import_module("topklab.kernels.topk")
    monkeypatch.setattr(topk_module, "_split_finalize", lambda expected, rows, device: True)
    for name, value in (("CUT_CAP", cut_cap), ("WIDE_BINS", wide_bins)):
        if value is not None:
            monkeypatch.setattr(topk_module, name, value)
    b, hq, hkv, d = 2, 32, 8, 128
    q, keys = _randn(cuda_rng, b, hq, d, dtype=torch.bfloat16), _randn(cuda_rng, b, hkv, n, d, dtype=torch.bfloat16)
    lengths = torch.tensor([n, n // 3 - 5], device="cuda")
    got = topk(q, keys, k, lengths=lengths, per_kv_head=per_kv_head)
    ref = topk_reference(q, keys, k, lengths=lengths, per_kv_head=per_kv_head)
    _check_topk_close(got, ref, q, keys, lengths=lengths, per_kv_head=per_kv_head)
    scratch = topk_module._SCRATCH[topk_module._scratch_key(q.device)]
    assert not bool(scratch["workspace"].any()) and not bool(scratch["histograms"].any())


@pytest.mark.parametrize("k", [64, 2048, 8192])
def test_sort_kernel_matches_the_torch_sort_on_gpu(cuda_rng, k):
    topk_module = importlib.import_module("topklab.kernels.topk")  # the package's `topk` attribute is the function
    scores = torch.randint(-50, 50, (64, k), generator=cuda_rng, device="cuda").float() * 0.25
    indices = torch.randint(0, 1 << 20, (64, k), generator=cuda_rng, device="cuda")
    scores[::3, k // 2:], indices[::3, k // 2:] = float("-inf"), -1
    ref = topk_module._sort_best_first(scores.clone(), indices.clone())
    got = topk_module._sort_rows_in_registers(scores.clone(), indices.clone())
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_topk_on_strided_key_views(cuda_rng, per_kv_head):
    """Keys read in place from a fused K/V cache longer than the context (2d between keys, a longer row per KV head):
    the score kernel's loads and its L2 prefetch stay inside each row's valid keys."""
    b, hq, hkv, n, d, k = 2, 32, 8, 32771, 128, 512
    q = _randn(cuda_rng, b, hq, d, dtype=torch.bfloat16)
    keys = _randn(cuda_rng, b, hkv, n + 77, 2, d, dtype=torch.bfloat16)[:, :, :n, 0]
    assert keys.stride(2) == 2 * d
    lengths = torch.tensor([n, n // 2 + 3], device="cuda")
    got = topk(q, keys, k, lengths=lengths, per_kv_head=per_kv_head)
    ref = topk_reference(q, keys, k, lengths=lengths, per_kv_head=per_kv_head)
    _check_topk_close(got, ref, q, keys, lengths=lengths, per_kv_head=per_kv_head)


@pytest.mark.parametrize("k", [64, 2048])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_topk_and_attention_with_starts(cuda_rng, k, per_kv_head):
    """Left padding at full size: valid keys [start, length), sampled rows, a row barely longer than k."""
    b, hq, hkv, n, d = 3, 32, 8, 131089, 128
    q, keys = _randn(cuda_rng, b, hq, d, dtype=torch.bfloat16), _randn(cuda_rng, b, hkv, n, d, dtype=torch.bfloat16)
    values = _randn(cuda_rng, b, hkv, n, d, dtype=torch.bfloat16)
    starts = torch.tensor([0, 40000, n - k - 3], device="cuda")
    lengths = torch.tensor([n, n - 1000, n], device="cuda")
    got = topk(q, keys, k, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
    ref = topk_reference(q, keys, k, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
    _check_topk_close(got, ref, q, keys, lengths=lengths, per_kv_head=per_kv_head)
    assert bool((got[1][1] >= 40000).all()) and bool((got[1][2] >= n - k - 3).all())
    out = topk_attention(q, keys, values, k, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
    ref_out = topk_attention_reference(q, keys, values, k, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_ties_exact_on_gpu(dtype):
    gen = torch.Generator().manual_seed(7)
    q, keys = _small_ints(gen, 3, 32, 128, dtype=dtype), _small_ints(gen, 3, 8, 20000, 128, dtype=dtype)
    keys[:, :, 10000:] = keys[:, :, :10000]
    q, keys = q.cuda(), keys.cuda()
    for k in (1, 777, 4096):
        got, ref = topk(q, keys, k), topk_reference(q, keys, k)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_exact_indexer_uses_the_kernel_on_cuda(cuda_rng):
    queries, keys = _randn(cuda_rng, 2, 4, 9, 64), _randn(cuda_rng, 2, 4, 3000, 64, dtype=torch.bfloat16)
    got = exact_topk(queries, keys, 100)
    ref = topk_reference(queries, keys, 100)
    _check_topk_close(got, ref, queries, keys)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True])
def test_sparse_attention_matches_reference(cuda_rng, dtype, shared):
    b, hq, hkv, n, d, k = 3, 32, 8, 20000, 128, 2048
    q = _randn(cuda_rng, b, hq, d, dtype=dtype)
    keys, values = _randn(cuda_rng, b, hkv, n, d, dtype=dtype), _randn(cuda_rng, b, hkv, n, d, dtype=dtype)
    indices = torch.randint(-1, n, (b, hkv if shared else hq, k), device="cuda", generator=cuda_rng)
    indices[1, 2] = -1
    got = sparse_decode_attention(q, keys, values, indices)
    ref = sparse_decode_attention_reference(q, keys, values, indices)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_topk_attention_matches_reference(cuda_rng, per_kv_head):
    b, hq, hkv, n, d, k = 2, 32, 8, 70000, 128, 2048
    q = _randn(cuda_rng, b, hq, d, dtype=torch.bfloat16)
    keys, values = (_randn(cuda_rng, b, hkv, n, d, dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([n, 1000], device="cuda")
    got = topk_attention(q, keys, values, k, lengths=lengths, per_kv_head=per_kv_head)
    ref = topk_attention_reference(q, keys, values, k, lengths=lengths, per_kv_head=per_kv_head)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("b,m,h,n,d", [(16, 1, 64, 65536, 128), (2, 7, 32, 5000, 128), (3, 2, 5, 333, 64)])
def test_fp8_index_scores_matches_reference(b, m, h, n, d):
    gen = torch.Generator().manual_seed(11)
    args = [t.cuda() for t in _fp8_inputs(gen, b, m, h, n, d)]
    got, ref = fp8_index_scores(*args), fp8_index_scores_reference(*args)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
