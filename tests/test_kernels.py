"""The Triton kernels against their torch references, run on the CPU through Triton's interpreter.

The ``kernels`` fixture re-imports the kernel modules under ``TRITON_INTERPRET=1`` (see run_on_interpreter). Shapes are small and odd;
inputs are fresh random numbers, plus small-integer inputs whose dot products are exact so that ties, and the
lower-index tie rule, can be checked exactly. The H100 runs the same comparisons at full size
(tests/test_kernels_gpu.py).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from topklab.kernels.fp8_index import dequantize_fp8, hadamard_rotate, quantize_fp8

triton = pytest.importorskip("triton")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules with their Triton code on the interpreter (CPU tensors take the Triton path)."""
    from topklab.kernels._triton import run_on_interpreter

    with run_on_interpreter():
        yield types.SimpleNamespace(**{name: sys.modules[f"topklab.kernels.{module}"] for name, module in
                                       (("fp8", "fp8_index"), ("topk", "topk"), ("attention", "sparse_attention"))})


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _small_ints(gen, *shape, dtype=torch.float32):
    """Integers in [-2, 2]: every dot product is exact in any order, so ties are real ties."""
    return torch.randint(-2, 3, shape, generator=gen).to(dtype)


def _check_topk_close(got, ref, q, keys, lengths=None, per_kv_head=False):
    """Same scores (to fp32 rounding) and an index set that differs from the reference only at near-ties."""
    scores, indices = got
    ref_scores, ref_indices = ref
    assert scores.shape == ref_scores.shape and indices.dtype == torch.int64
    scale = ref_scores[torch.isfinite(ref_scores)].abs().max().clamp(min=1.0)
    finite = torch.isfinite(ref_scores)
    assert torch.equal(finite, torch.isfinite(scores)), "padding (-inf / -1) differs from the reference"
    assert torch.equal(indices < 0, ref_indices < 0)
    torch.testing.assert_close(scores[finite], ref_scores[finite], rtol=0, atol=2e-5 * float(scale))
    # every chosen index is valid, unique per row, and really scores at least the reference's k-th score
    valid = indices >= 0
    lead = indices.shape[:-1]
    flat = indices.reshape(-1, indices.shape[-1])
    for row in flat:
        kept = row[row >= 0]
        assert kept.unique().numel() == kept.numel(), "an index was selected twice"
    exact = _exact_scores(q, keys, per_kv_head)  # fp64 [*lead, N]
    exact = exact.reshape(*lead, -1)
    chosen = torch.gather(exact, -1, indices.clamp(min=0))
    kth = ref_scores.masked_fill(~finite, float("inf")).amin(dim=-1, keepdim=True).double()
    assert bool((chosen[valid] >= (kth.expand_as(chosen)[valid] - 4e-5 * float(scale))).all())
    if lengths is not None:
        n_per_row = lengths.repeat_interleave(flat.shape[0] // lengths.shape[0]).view(*lead, 1)
        assert bool((indices < n_per_row).all())


def _exact_scores(q, keys, per_kv_head):
    if q.dim() == keys.dim() - 1:
        b, hq, d = q.shape
        hkv = keys.shape[1]
        q = q.reshape(b, hkv, hq // hkv, d)
    scores = torch.matmul(q.double(), keys.double().transpose(-1, -2))
    return scores.sum(dim=-2, keepdim=True) if per_kv_head else scores


# ---------------------------------------------------------------------------------------------- FP8 index scoring
def test_hadamard_is_orthonormal_and_keeps_dot_products(rng):
    x = _randn(rng, 5, 64)
    y = _randn(rng, 7, 64)
    torch.testing.assert_close(hadamard_rotate(x) @ hadamard_rotate(y).T, x @ y.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hadamard_rotate(hadamard_rotate(x)), x, rtol=1e-5, atol=1e-5)  # H is symmetric
    with pytest.raises(ValueError, match="power of two"):
        hadamard_rotate(_randn(rng, 3, 48))


@pytest.mark.parametrize("pow2_scale", [False, True])
def test_quantize_fp8_roundtrip(rng, pow2_scale):
    x = _randn(rng, 3, 5, 256) * 7
    x[0, 0, :128] = 0.0  # an all-zero block must stay safe
    x_fp8, scale = quantize_fp8(x, block=128, pow2_scale=pow2_scale)
    assert x_fp8.dtype == torch.float8_e4m3fn and scale.shape == (3, 5, 2) and scale.dtype == torch.float32
    assert float(scale[0, 0, 0]) == 1.0 and bool((x_fp8[0, 0, :128].float() == 0).all())
    if pow2_scale:
        assert bool((torch.log2(scale) == torch.log2(scale).round()).all())
    blocks = x.view(3, 5, 2, 128)
    assert bool((blocks.abs().amax(-1) / scale <= 448.0 * (1 + 1e-6)).all())
    err = (dequantize_fp8(x_fp8, scale) - x).view(3, 5, 2, 128).abs()
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal step 2^-9 of the scale
    bound = blocks.abs() * 2**-4 + scale.unsqueeze(-1) * 2**-9
    assert bool((err <= bound + 1e-12).all())
    with pytest.raises(ValueError, match="multiple of block"):
        quantize_fp8(_randn(rng, 2, 96), block=128)


def _fp8_inputs(gen, b, m, h, n, d):
    q_fp8, q_scale = quantize_fp8(hadamard_rotate(_randn(gen, b, m, h, d)), block=d)
    k_fp8, k_scale = quantize_fp8(hadamard_rotate(_randn(gen, b, n, d)), block=d)
    weights = _randn(gen, b, m, h) * h**-0.5
    return q_fp8, q_scale.squeeze(-1), k_fp8, k_scale.squeeze(-1), weights


@pytest.mark.parametrize("b,m,h,n,d", [(2, 3, 5, 200, 64), (1, 9, 16, 130, 128), (3, 1, 4, 77, 32)])
def test_fp8_index_scores_kernel_matches_reference(kernels, rng, b, m, h, n, d):
    args = _fp8_inputs(rng, b, m, h, n, d)
    got = kernels.fp8.fp8_index_scores(*args)
    ref = kernels.fp8.fp8_index_scores_reference(*args)
    assert got.shape == (b, m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # and the reference itself is the formula, computed independently in fp64
    q_fp8, q_scale, k_fp8, k_scale, w = args
    dots = torch.einsum("bmhd,bnd->bmhn", q_fp8.double(), k_fp8.double())
    formula = (w.double()[..., None] * torch.relu(dots * q_scale.double()[..., None] * k_scale.double()[:, None, None])).sum(2)
    torch.testing.assert_close(ref.double(), formula, rtol=1e-5, atol=1e-5 * float(formula.abs().max()))


def test_fp8_index_scores_rejects_bad_input(rng):
    q_fp8, q_scale, k_fp8, k_scale, w = _fp8_inputs(rng, 1, 2, 4, 10, 64)
    from topklab.kernels.fp8_index import fp8_index_scores_reference

    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_index_scores_reference(q_fp8.float(), q_scale, k_fp8, k_scale, w)
    with pytest.raises(ValueError, match="d <= 128"):
        big = quantize_fp8(_randn(rng, 1, 2, 4, 256), block=256)[0]
        fp8_index_scores_reference(big, q_scale, quantize_fp8(_randn(rng, 1, 10, 256), block=256)[0], k_scale, w)
    with pytest.raises(ValueError, match="weights must have shape"):
        fp8_index_scores_reference(q_fp8, q_scale, k_fp8, k_scale, w[:, :1])


# ---------------------------------------------------------------------------------------------- exact Top-k
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,hq,hkv,n,d,k", [
    (2, 8, 2, 1000, 64, 37),     # GQA, odd N and k
    (1, 3, 3, 333, 48, 333),     # k = N, non-power-of-two d
    (2, 4, 1, 777, 32, 1),       # k = 1
    (1, 4, 2, 4100, 64, 16),     # more keys than SAMPLE: a sampled threshold, several programs per row
])
def test_topk_kernel_matches_reference(kernels, rng, dtype, b, hq, hkv, n, d, k):
    q, keys = _randn(rng, b, hq, d, dtype=dtype), _randn(rng, b, hkv, n, d, dtype=dtype)
    got = kernels.topk.topk(q, keys, k)
    ref = kernels.topk.topk_reference(q, keys, k)
    assert got[0].shape == (b, hq, k)
    _check_topk_close(got, ref, q, keys)


def test_topk_on_strided_key_views(kernels, rng):
    """Keys read in place from a fused K/V cache longer than the context (2d between keys)."""
    b, hq, hkv, n, d, k = 2, 4, 2, 301, 32, 9
    q = _randn(rng, b, hq, d)
    keys = _randn(rng, b, hkv, n + 7, 2, d)[:, :, :n, 0]
    lengths = torch.tensor([n, 150])
    got = kernels.topk.topk(q, keys, k, lengths=lengths)
    _check_topk_close(got, kernels.topk.topk_reference(q, keys, k, lengths=lengths), q, keys, lengths=lengths)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_topk_with_starts_and_lengths(kernels, rng, per_kv_head):
    """Left padding: valid keys [start, length) per sequence; rows of more than SAMPLE keys are sampled, one row is
    shorter than k, one starts past the first tile."""
    b, hq, hkv, n, d, k = 4, 8, 2, 4600, 32, 40
    q, keys = _randn(rng, b, hq, d, dtype=torch.bfloat16), _randn(rng, b, hkv, n, d, dtype=torch.bfloat16)
    starts, lengths = torch.tensor([0, 300, 4570, 17]), torch.tensor([4600, 4600, 4600, 4400])
    got = kernels.topk.topk(q, keys, k, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
    ref = kernels.topk.topk_reference(q, keys, k, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
    _check_topk_close(got, ref, q, keys, lengths=lengths, per_kv_head=per_kv_head)
    rows = got[1].shape[1]
    assert bool((got[1][1] >= 300).all()) and bool((got[1][2, :, :30] >= 4570).all())
    assert bool((got[1][2, :, 30:] == -1).all()) and got[1].shape == (b, rows, k)
    out = kernels.attention.topk_attention(q, keys, keys, k, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
    ref_out = kernels.attention.topk_attention_reference(q, keys, keys, k, lengths=lengths, starts=starts,
                                                         per_kv_head=per_kv_head)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)


def test_topk_rejects_bad_ranges(rng):
    from topklab.kernels.topk import topk

    q, keys = _randn(rng, 2, 4, 16), _randn(rng, 2, 2, 50, 16)
    with pytest.raises(ValueError, match="starts must be a 1-D tensor of 2"):
        topk(q, keys, 5, starts=torch.tensor([0]))
    with pytest.raises(ValueError, match="starts must be an integer tensor"):
        topk(q, keys, 5, starts=torch.tensor([0.0, 1.0]))
    assert bool((topk(q, keys, 5, starts=torch.tensor([0, 48]))[1][1, :, 2:] == -1).all())


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_topk_with_lengths_and_shared_selection(kernels, rng, per_kv_head):
    b, hq, hkv, n, d, k = 3, 8, 2, 600, 64, 50
    q, keys = _randn(rng, b, hq, d, dtype=torch.bfloat16), _randn(rng, b, hkv, n, d, dtype=torch.bfloat16)
    lengths = torch.tensor([600, 31, 257])  # the second sequence is shorter than k: padded with -1 / -inf
    got = kernels.topk.topk(q, keys, k, lengths=lengths, per_kv_head=per_kv_head)
    ref = kernels.topk.topk_reference(q, keys, k, lengths=lengths, per_kv_head=per_kv_head)
    assert got[1].shape == (b, hkv if per_kv_head else hq, k)
    assert bool((got[1][1, :, 31:] == -1).all()) and bool((got[1][1, :, :31] >= 0).all())
    _check_topk_close(got, ref, q, keys, lengths=lengths, per_kv_head=per_kv_head)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(500, 1), (500, 123), (2048, 300), (64, 64)])
def test_topk_ties_break_to_lower_index_exactly(kernels, rng, dtype, n, k):
    q, keys = _small_ints(rng, 2, 4, 16, dtype=dtype), _small_ints(rng, 2, 2, n, 16, dtype=dtype)
    keys[:, :, n // 2:] = keys[:, :, : n - n // 2]  # duplicated keys: many exact ties
    got = kernels.topk.topk(q, keys, k)
    ref = kernels.topk.topk_reference(q, keys, k)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("n", [300, 9000])  # 9000: every key is a candidate, more than one register chunk
def test_topk_all_scores_equal_takes_the_first_k(kernels, rng, n):
    keys = _randn(rng, 1, 1, 1, 32).expand(1, 1, n, 32).contiguous()
    q = _randn(rng, 1, 2, 32)
    scores, indices = kernels.topk.topk(q, keys, 40)
    assert torch.equal(indices, torch.arange(40).expand(1, 2, 40))


@pytest.mark.parametrize("cut_block,finalize_block", [(512, None), (1, None), (512, 64)])
def test_topk_finalize_paths_are_exact(kernels, rng, monkeypatch, cut_block, finalize_block):
    """After its first radix pass the finalize copies the cut's bin out and narrows it alone (when it holds at most
    CUT_BLOCK candidates; 1 forces the passes over every candidate); candidates past its register block are read
    in chunks (a block of 64 forces that): each path exact, ties to the lower index included."""
    monkeypatch.setattr(kernels.topk, "CUT_BLOCK", cut_block)
    if finalize_block:
        monkeypatch.setattr(kernels.topk, "_finalize_block", lambda expected: finalize_block)
    for make in (_randn, _small_ints):
        q, keys = make(rng, 2, 4, 16), make(rng, 2, 2, 4500, 16)
        kernels.topk.clear_scratch()
        cut_bins = kernels.topk._scratch(q.device, "cut_bins", (4096,), torch.int64, zeroed=True)
        got = kernels.topk.topk(q, keys, 150)
        ref = kernels.topk.topk_reference(q, keys, 150)
        if make is _small_ints:
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        else:
            _check_topk_close(got, ref, q, keys)
            assert bool(cut_bins.any()) == (cut_block > 1), "the cut's bin was (not) copied out"


def _check_exact_on_duplicated_keys(topk_module, rng, per_kv_head):
    """Small-integer keys, each twice: many exact ties, broken to the lower index exactly as the reference does."""
    q, keys = _small_ints(rng, 2, 4, 16), _small_ints(rng, 2, 2, 2048, 16)
    keys[:, :, 1024:] = keys[:, :, :1024]
    for k in (1, 300, 2048):
        got = topk_module.topk(q, keys, k, per_kv_head=per_kv_head)
        ref = topk_module.topk_reference(q, keys, k, per_kv_head=per_kv_head)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("cut_cap,wide_bins", [(2048, 2048), (64, 4)])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_topk_split_finalize_is_exact(kernels, rng, monkeypatch, cut_cap, wide_bins, per_kv_head):
    """Rows of many candidates are cut in parts (histogram, route, then the finalize over the cut's bin); forced
    here for every row. Sampled and fully sampled rows, left padding, a row shorter than k, ties to the lower index;
    with 4 bins the cut's bin outgrows a cut buffer of 64, so the rows fall back to the whole finalize. The
    workspace and the histograms are left zeroed."""
    monkeypatch.setattr(kernels.topk, "_split_finalize", lambda expected, rows, device: True)
    monkeypatch.setattr(kernels.topk, "CUT_CAP", cut_cap)
    monkeypatch.setattr(kernels.topk, "WIDE_BINS", wide_bins)
    kernels.topk.clear_scratch()
    kernels.topk._scratch(torch.device("cpu"), "cut_rows", (64 * 2048,), torch.int64, zeroed=True)
    q, keys = _randn(rng, 3, 4, 16), _randn(rng, 3, 2, 4500, 16)
    starts, lengths = torch.tensor([0, 100, 4400]), torch.tensor([4500, 3000, 4500])
    got = kernels.topk.topk(q, keys, 150, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
    ref = kernels.topk.topk_reference(q, keys, 150, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
    _check_topk_close(got, ref, q, keys, lengths=lengths, per_kv_head=per_kv_head)
    scratch = kernels.topk._SCRATCH[kernels.topk._scratch_key(q.device)]
    assert bool(scratch["cut_rows"].any()) == (cut_cap > 64), "the cut's bin was (not) routed to the cut buffer"
    _check_exact_on_duplicated_keys(kernels.topk, rng, per_kv_head)
    assert not bool(scratch["workspace"].any()) and not bool(scratch["histograms"].any())


@pytest.mark.parametrize("sublists,per_kv_head", [(4, False), (3, True)])
def test_topk_segmented_candidate_lists_are_exact(kernels, rng, monkeypatch, sublists, per_kv_head):
    """Candidates appended to several segments per row (one per score program's split mod SUBLISTS, each with its
    own counter), forced for every row: read back through the layout by the finalize (registers and chunks), the
    rescan, and the histogram and route kernels of the finalize in parts. Left padding, a row shorter than k, exact
    ties; every counter is left zeroed."""
    topk_module = kernels.topk
    monkeypatch.setattr(topk_module, "_sublists", lambda expected, n, rows, device: sublists)
    topk_module.clear_scratch()
    q, keys = _randn(rng, 3, 4, 16), _randn(rng, 3, 2, 4500, 16)
    starts, lengths = torch.tensor([0, 100, 4400]), torch.tensor([4500, 3000, 4500])
    for finalize_block, split in ((None, False), (64, False), (None, True)):
        with monkeypatch.context() as patch:
            if finalize_block:  # candidates past the register block, read in chunks
                patch.setattr(topk_module, "_finalize_block", lambda expected: finalize_block)
            patch.setattr(topk_module, "_split_finalize", lambda expected, rows, device: split)
            got = topk_module.topk(q, keys, 150, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
        ref = topk_module.topk_reference(q, keys, 150, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
        _check_topk_close(got, ref, q, keys, lengths=lengths, per_kv_head=per_kv_head)
    _check_exact_on_duplicated_keys(topk_module, rng, per_kv_head)
    with monkeypatch.context() as patch:  # a threshold far too high: the rescan overwrites the segments
        patch.setattr(topk_module, "SAMPLE_SLACK", -1e6)
        patch.setattr(topk_module, "SAMPLE", 256)
        got = topk_module.topk(q, keys, 64, lengths=lengths, per_kv_head=per_kv_head)
    ref = topk_module.topk_reference(q, keys, 64, lengths=lengths, per_kv_head=per_kv_head)
    _check_topk_close(got, ref, q, keys, lengths=lengths, per_kv_head=per_kv_head)
    scratch = topk_module._SCRATCH[topk_module._scratch_key(q.device)]
    assert not bool(scratch["workspace"].any())


def test_topk_segments_the_candidates_of_dense_rows_that_fit_one_wave():
    from topklab.kernels.topk import SUBLISTS, _sublists

    cpu = torch.device("cpu")  # 4 "SMs" (sm_count)
    assert _sublists(8192 / 16, 8192, 4, cpu) == SUBLISTS <= 4  # the layout (_slots) holds at most 4 segments
    assert _sublists(8192 / 16 - 1, 8192, 4, cpu) == 1 and _sublists(8192, 8192, 5, cpu) == 1


def test_topk_splits_the_finalize_of_long_rows_that_leave_sms_idle():
    from topklab.kernels.topk import SPLIT_ALWAYS_FROM, SPLIT_FROM, _split_finalize

    cpu = torch.device("cpu")  # 4 "SMs" (sm_count)
    assert _split_finalize(SPLIT_FROM + 1, 4, cpu) and not _split_finalize(SPLIT_FROM + 1, 5, cpu)
    assert not _split_finalize(SPLIT_FROM, 1, cpu)
    assert _split_finalize(SPLIT_ALWAYS_FROM + 1, 512, cpu)


@pytest.mark.parametrize("k", [1, 37, 300])
def test_topk_sort_kernel_orders_rows_as_the_torch_sort(kernels, rng, k):
    """Rows best first, ties to the lower index, padding (-inf, -1) last: the one-launch sort and the torch sort
    agree exactly (scores with many ties, zeros, negative scores; the finalize never writes -0.0)."""
    rows = 5
    scores = torch.randint(-3, 4, (rows, k), generator=rng).float() * 0.5
    indices = torch.stack([torch.randperm(10 * k, generator=rng)[:k] for _ in range(rows)])
    pad = torch.arange(k) >= k - k // 3  # the last third of each row is padding in rows 1 and 3
    for r in (1, 3):
        scores[r, pad], indices[r, pad] = float("-inf"), -1
    ref = kernels.topk._sort_best_first(scores.clone(), indices.clone())
    got = kernels.topk._sort_rows_in_registers(scores.clone(), indices.clone())
    assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0])


def test_topk_leaves_its_workspace_zeroed_for_the_next_call(kernels, rng):
    """The candidate counters are reused without a memset: each call must clear every row it used."""
    q, keys = _randn(rng, 2, 4, 32), _randn(rng, 2, 2, 4500, 32)  # a sampled row and a short one
    lengths = torch.tensor([4500, 17])
    first = kernels.topk.topk(q, keys, 20, lengths=lengths)
    workspace = kernels.topk._SCRATCH[kernels.topk._scratch_key(q.device)]["workspace"]
    assert workspace.numel() >= 8 * kernels.topk.WORKSPACE_WIDTH and not bool(workspace.any())
    again = kernels.topk.topk(q, keys, 20, lengths=lengths)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    _check_topk_close(again, kernels.topk.topk_reference(q, keys, 20, lengths=lengths), q, keys, lengths=lengths)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_topk_rescans_a_row_when_the_sampled_threshold_misses(kernels, rng, monkeypatch, per_kv_head):
    """A threshold placed too high (here: forced to about the row's maximum) leaves fewer than k candidates: the
    finalize must rescan the row and still return the exact Top-k, also for rows shorter than the sample."""
    monkeypatch.setattr(kernels.topk, "SAMPLE_SLACK", -1e6)
    monkeypatch.setattr(kernels.topk, "SAMPLE", 256)  # both rows sampled (a fully sampled row never misses)
    q, keys = _randn(rng, 2, 4, 32), _randn(rng, 2, 2, 5000, 32)
    lengths = torch.tensor([5000, 700])
    got = kernels.topk.topk(q, keys, 64, lengths=lengths, per_kv_head=per_kv_head)
    ref = kernels.topk.topk_reference(q, keys, 64, lengths=lengths, per_kv_head=per_kv_head)
    _check_topk_close(got, ref, q, keys, lengths=lengths, per_kv_head=per_kv_head)
    workspace = kernels.topk._SCRATCH[kernels.topk._scratch_key(q.device)]["workspace"]
    assert not bool(workspace.any())


@pytest.mark.parametrize("n,k", [(3000, 100), (5000, 16), (9000, 3000)])
def test_topk_threshold_keeps_its_rank_of_samples_and_few_more(kernels, rng, n, k):
    """The candidate threshold: at least its rank of the row's samples reach it (all k when the row is sampled
    whole), which bounds the chance of a rescan; at most rank / 16 + 2 more, which bounds the candidates."""
    topk = kernels.topk
    q, keys = _randn(rng, 1, 4, 32), _randn(rng, 1, 2, n, 32)
    _check_topk_close(topk.topk(q, keys, k), topk.topk_reference(q, keys, k), q, keys)
    buffers = topk._SCRATCH[topk._scratch_key(q.device)]
    sample, rows = topk._sample_size(n), 4
    samples = buffers["samples"][:rows * sample].view(rows, sample)
    reach = (topk.ordered_keys(samples) >= buffers["thresholds"][:rows, None]).sum(dim=1)
    rank = topk._sample_rank(k, n, sample)
    assert rank == (k if n <= sample else rank)
    assert bool((reach >= rank).all()) and bool((reach <= rank + rank // 16 + 2).all()), (reach, rank)


def test_topk_bin_shift_maps_each_range_into_its_bins(kernels, rng, monkeypatch):
    """The radix passes' bin width: every key of [lo, hi] lands in one of NB bins, with the least width that does
    below 2**24 keys and at most twice it above (room for a shift read off the span as a float); no range (hi < lo)
    gets width 1."""
    tl = kernels.topk.tl
    # the interpreter runs a kernel's body in its module's globals, not its closure
    monkeypatch.setitem(globals(), "bin_shift", kernels.topk._bin_shift)

    @triton.jit
    def shifts(lo_ptr, hi_ptr, out_ptr, NB: tl.constexpr, BLOCK: tl.constexpr):
        for i in range(BLOCK):  # one scalar range at a time, as the kernels call it
            tl.store(out_ptr + i, bin_shift(tl.load(lo_ptr + i), tl.load(hi_ptr + i), NB))

    edges = [0, 1, 127, 128, 129, 255, 2**23, 2**24 - 1, 2**24, 2**24 + 1, 2**32 - 1, 2**32 + 2**31]
    spans = torch.tensor(edges + torch.randint(0, 2**33, (244,), generator=rng).tolist(), dtype=torch.int64)
    lo = torch.randint(-2**31, 2**31, (256,), generator=rng, dtype=torch.int64)
    for nb in (128, 2048):
        got = torch.empty(256, dtype=torch.int64)
        shifts[(1,)](lo, lo + spans, got, NB=nb, BLOCK=256)
        least = torch.tensor([max(0, s.bit_length() - nb.bit_length() + 1) for s in spans.tolist()])
        assert bool(((spans >> got) < nb).all())
        assert bool(((got == least) | ((got == least + 1) & (spans > 2**24))).all())
        shifts[(1,)](lo, lo - 1 - spans, got, NB=nb, BLOCK=256)
        assert not bool(got.any())


def test_topk_with_k_close_to_a_sampled_rows_length(kernels, rng):
    """k above the sample size on a sampled row: every valid key is a candidate (no rescan needed), still exact."""
    q, keys = _randn(rng, 1, 2, 16), _randn(rng, 1, 1, 5000, 16)
    lengths = torch.tensor([4500])
    got = kernels.topk.topk(q, keys, 4300, lengths=lengths)
    _check_topk_close(got, kernels.topk.topk_reference(q, keys, 4300, lengths=lengths), q, keys, lengths=lengths)


def test_topk_of_an_empty_batch(kernels, rng):
    scores, indices = kernels.topk.topk(_randn(rng, 0, 4, 16), _randn(rng, 0, 2, 50, 16), 5)
    assert scores.shape == indices.shape == (0, 4, 5)


def test_topk_sample_rank_bounds_the_miss_probability():
    """The threshold's rank: exact (k) when every key is sampled, otherwise above the expected number of top-k
    hits in the sample by >= 5 standard deviations, and never more than the sample."""
    from topklab.kernels.topk import SAMPLE, _sample_rank, _sample_size

    assert _sample_rank(37, SAMPLE) == 37 and _sample_rank(1, 10) == 1
    for n, k in ((131072, 64), (131072, 2048), (524288, 32768), (SAMPLE + 1, SAMPLE), (8192, 64), (8192, 2048),
                 (20000, 3000)):
        sample = _sample_size(n)
        lam = k * sample / n
        rank = _sample_rank(k, n, sample)
        assert rank <= sample and (rank == sample or rank > lam + 5 * lam**0.5)


def test_topk_samples_fewer_keys_of_short_rows():
    """Every key of rows up to SAMPLE; an eighth of a short row's keys (at least 1024); SAMPLE from 32K keys on."""
    from topklab.kernels.topk import SAMPLE, _sample_size

    assert [_sample_size(n) for n in (100, SAMPLE, SAMPLE + 1, 8192, 16384, 20000, 32768, 131072)] == \
        [SAMPLE, SAMPLE, 1024, 1024, 2048, 4096, 4096, 4096]


def test_topk_folded_queries_and_unsorted_output(kernels, rng):
    q, keys = _randn(rng, 2, 3, 5, 32), _randn(rng, 2, 3, 400, 32)  # [*, M, d] with [*, N, d]
    ref = kernels.topk.topk_reference(q, keys, 20)
    got = kernels.topk.topk(q, keys, 20)
    _check_topk_close(got, ref, q, keys)
    unsorted_scores, unsorted_idx = kernels.topk.topk(q, keys, 20, sorted=False)
    assert torch.equal(unsorted_idx.sort(-1).values, got[1].sort(-1).values)


def test_topk_rejects_bad_input(rng):
    from topklab.kernels.topk import topk, topk_reference

    q, keys = _randn(rng, 1, 4, 32), _randn(rng, 1, 2, 50, 32)
    with pytest.raises(ValueError, match=r"k must be in \[1, N\]"):
        topk(q, keys, 51)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        topk(_randn(rng, 1, 3, 32), keys, 5)
    with pytest.raises(ValueError, match="head dim"):
        topk(_randn(rng, 1, 4, 16), keys, 5)
    with pytest.raises(ValueError, match="lengths"):
        topk(q, keys, 5, lengths=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="no keys to select from"):  # an empty cache, in either layout
        topk(q, keys[:, :, :0], 1)
    with pytest.raises(ValueError, match="no keys to select from"):
        topk(keys[:, :, :3], keys[:, :, :0], 1)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        topk(q, keys[:, :0], 1)
    bad = keys.clone()
    bad[0, 1, 7, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):  # the reference's check (the CUDA path does not scan K)
        topk_reference(q, bad, 5)


def test_topk_takes_narrow_integer_ranges(rng):
    """uint8 / int8 / int16 lengths are widened before their clamp to N (which a narrow type may not hold)."""
    from topklab.kernels.topk import topk

    q, keys = _randn(rng, 2, 4, 16), _randn(rng, 2, 2, 300, 16)
    for dtype, values in ((torch.uint8, [200, 90]), (torch.int8, [127, 90]), (torch.int16, [200, 90])):
        want = topk(q, keys, 8, lengths=torch.tensor(values))
        got = topk(q, keys, 8, lengths=torch.tensor(values, dtype=dtype))
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), dtype


# ---------------------------------------------------------------------------------------------- sparse attention
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True])
def test_sparse_decode_attention_matches_reference(kernels, rng, dtype, shared):
    b, hq, hkv, n, d, k = 2, 8, 2, 300, 48, 70
    q = _randn(rng, b, hq, d, dtype=dtype)
    keys, values = _randn(rng, b, hkv, n, d, dtype=dtype), _randn(rng, b, hkv, n, d, dtype=dtype)
    indices = torch.randint(-1, n, (b, hkv if shared else hq, k), generator=rng)
    indices[0, 0] = -1  # a row that selects nothing attends to nothing
    got = kernels.attention.sparse_decode_attention(q, keys, values, indices)
    ref = kernels.attention.sparse_decode_attention_reference(q, keys, values, indices)
    assert got.shape == (b, hq, d) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    group = hq // hkv if shared else 1
    assert bool((got[0, :group] == 0).all())


def test_sparse_reference_is_masked_dense_softmax(rng):
    """The reference equals dense softmax attention with every unselected key masked."""
    from topklab.kernels.sparse_attention import sparse_decode_attention_reference

    b, hq, hkv, n, d, k = 1, 4, 2, 50, 16, 9
    q, keys, values = _randn(rng, b, hq, d), _randn(rng, b, hkv, n, d), _randn(rng, b, hkv, n, d)
    indices = torch.stack([torch.randperm(n, generator=rng)[:k] for _ in range(hq)]).view(b, hq, k)
    kv = torch.arange(hq) // (hq // hkv)
    scores = torch.einsum("hd,hnd->hn", q[0].double(), keys[0, kv].double()) * d**-0.5
    mask = torch.full_like(scores, float("-inf")).scatter(1, indices[0], 0.0)
    dense = torch.einsum("hn,hnd->hd", torch.softmax(scores + mask, dim=-1), values[0, kv].double())
    torch.testing.assert_close(sparse_decode_attention_reference(q, keys, values, indices)[0].double(), dense,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_topk_attention_select_and_attend(kernels, rng, per_kv_head):
    b, hq, hkv, n, d, k = 2, 4, 2, 500, 32, 40
    q = _randn(rng, b, hq, d, dtype=torch.float16)
    keys, values = _randn(rng, b, hkv, n, d, dtype=torch.float16), _randn(rng, b, hkv, n, d, dtype=torch.float16)
    lengths = torch.tensor([500, 25])
    got = kernels.attention.topk_attention(q, keys, values, k, lengths=lengths, per_kv_head=per_kv_head)
    ref = kernels.attention.topk_attention_reference(q, keys, values, k, lengths=lengths, per_kv_head=per_kv_head)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-3, atol=2e-3)


def test_sparse_attention_rejects_bad_indices(rng):
    from topklab.kernels.sparse_attention import sparse_decode_attention, sparse_decode_attention_reference

    q, keys = _randn(rng, 1, 4, 16), _randn(rng, 1, 2, 20, 16)
    with pytest.raises(ValueError, match=r"\[B, Hq, k\]"):
        sparse_decode_attention(q, keys, keys, torch.zeros(1, 3, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="int32/int64"):
        sparse_decode_attention(q, keys, keys, torch.zeros(1, 4, 5))
    for outside in (20, -2):  # the reference refuses them; the CUDA path skips them (see below)
        with pytest.raises(ValueError, match=r"valid are 0..N-1 = 0..19"):
            sparse_decode_attention_reference(q, keys, keys, torch.full((1, 4, 5), outside))
    with pytest.raises(ValueError, match="multiple of Hkv"):
        sparse_decode_attention(q, keys[:, :0], keys[:, :0], torch.zeros(1, 4, 5, dtype=torch.int64))


def test_sparse_attention_of_nothing_is_zeros(kernels, rng):
    """No sequence, no selected slot, or an empty cache: zeros of the right shape on both paths, no launch."""
    q, keys = _randn(rng, 2, 4, 16), _randn(rng, 2, 2, 20, 16)
    cases = [(q[:0], keys[:0], torch.zeros(0, 4, 3, dtype=torch.int64)),
             (q, keys, torch.zeros(2, 4, 0, dtype=torch.int64)),
             (q, keys[:, :, :0], torch.full((2, 2, 3), -1))]
    for args in cases:
        for attend in (kernels.attention.sparse_decode_attention, kernels.attention.sparse_decode_attention_reference):
            out = attend(args[0], args[1], args[1], args[2])
            assert out.shape == args[0].shape and not out.any()


def test_sparse_attention_kernel_skips_indices_outside_the_cache(kernels, rng):
    """Never a read outside K / V: an index >= N in the kernel path counts as an empty slot."""
    q, keys, values = _randn(rng, 1, 4, 16), _randn(rng, 1, 2, 20, 16), _randn(rng, 1, 2, 20, 16)
    indices = torch.randint(0, 20, (1, 4, 6), generator=rng)
    outside = indices.clone()
    outside[..., -2:] = 20 + torch.arange(2)
    inside = indices.clone()
    inside[..., -2:] = -1
    torch.testing.assert_close(kernels.attention.sparse_decode_attention(q, keys, values, outside),
                               kernels.attention.sparse_decode_attention_reference(q, keys, values, inside))


def test_fp8_index_scores_of_empty_inputs(kernels, rng):
    q = kernels.fp8.quantize_fp8(_randn(rng, 1, 2, 3, 64), block=64)
    k = kernels.fp8.quantize_fp8(_randn(rng, 1, 8, 64), block=64)
    w = _randn(rng, 1, 2, 3)
    for keep in ("keys", "queries", "batch"):
        qv, qs, kv, ks, ww = q[0], q[1], k[0], k[1], w
        if keep == "keys":
            kv, ks = kv[:, :0], ks[:, :0]
        elif keep == "queries":
            qv, qs, ww = qv[:, :0], qs[:, :0], ww[:, :0]
        else:
            qv, qs, kv, ks, ww = qv[:0], qs[:0], kv[:0], ks[:0], ww[:0]
        out = kernels.fp8.fp8_index_scores(qv, qs, kv, ks, ww)
        assert out.shape == (qv.shape[0], qv.shape[1], kv.shape[1]) and out.numel() == 0


def test_pdl_only_on_hopper_and_can_be_turned_off(monkeypatch):
    """Programmatic dependent launch needs compute capability >= 9; TOPKLAB_PDL=0 turns it off. The decision is
    cached per device (a launch must not read the environment)."""
    from topklab.kernels import _triton

    for capability, env, expected in (((9, 0), None, True), ((8, 0), None, False), ((9, 0), "0", False),
                                      ((10, 0), "1", True)):
        monkeypatch.setattr(_triton, "_PDL", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        if env is None:
            monkeypatch.delenv("TOPKLAB_PDL", raising=False)
        else:
            monkeypatch.setenv("TOPKLAB_PDL", env)
        assert _triton.pdl_enabled(0) is expected
        monkeypatch.setenv("TOPKLAB_PDL", "1" if not expected else "0")
        assert _triton.pdl_enabled(0) is expected, "cached: the environment is read once per device"
