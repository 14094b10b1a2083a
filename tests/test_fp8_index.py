"""FP8 index scoring: the Triton kernel's wide product (the heads of several queries against one key tile) and its
runs of key tiles per program, against the torch reference, on the CPU interpreter and at full size on a GPU.

Shapes are chosen to cross the kernel's seams: several key tiles per program with a ragged last tile, several
query groups with a partly empty last one, heads that do not fill a power of two.
"""

from __future__ import annotations

import sys

import pytest
import torch

from topklab.kernels.fp8_index import fp8_index_scores, fp8_index_scores_reference, hadamard_rotate, quantize_fp8

pytest.importorskip("triton")


def _inputs(gen, b, m, h, n, d, device="cpu"):
    """Rotated, quantized random queries and keys (positive scales, as quantize_fp8 makes them), random weights."""
    q_fp8, q_scale = quantize_fp8(hadamard_rotate(torch.randn(b, m, h, d, generator=gen)), block=d)
    k_fp8, k_scale = quantize_fp8(hadamard_rotate(torch.randn(b, n, d, generator=gen)), block=d)
    weights = torch.randn(b, m, h, generator=gen) * h**-0.5
    return [t.to(device) for t in (q_fp8, q_scale[..., 0], k_fp8, k_scale[..., 0], weights)]


@pytest.fixture(scope="module")
def fp8_interpreted():
    """topklab.kernels.fp8_index with its kernel on Triton's interpreter (CPU tensors take the Triton path)."""
    from topklab.kernels._triton import run_on_interpreter

    with run_on_interpreter():
        yield sys.modules["topklab.kernels.fp8_index"]


@pytest.mark.parametrize("b,m,h,n,d", [
    (1, 4, 64, 1000, 128),  # 256 columns a product; 16 key tiles, runs of 2 per program, the last one ragged
    (2, 9, 64, 300, 128),  # 3 query groups of 4, the last holding one query
    (2, 3, 24, 700, 64),  # 24 heads padded to 32, 3 queries padded to 4 in one group
    (3, 2, 4, 500, 16),  # the Lightning indexer's small shapes: d = 16 padded to the 32 an FP8 product needs
])
def test_kernel_matches_reference(fp8_interpreted, rng, b, m, h, n, d):
    args = _inputs(rng, b, m, h, n, d)
    got = fp8_interpreted.fp8_index_scores(*args)
    ref = fp8_interpreted.fp8_index_scores_reference(*args)
    assert got.shape == (b, m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_kernel_turns_negative_scales_into_nan(fp8_interpreted, rng):
    """Scales come out of the ReLU in the kernel, so a negative one must not give plausible numbers."""
    q_fp8, q_scale, k_fp8, k_scale, w = _inputs(rng, 1, 3, 8, 200, 32)
    q_scale[0, 1, 2] = -q_scale[0, 1, 2]
    k_scale[0, 17] = -k_scale[0, 17]
    got = fp8_interpreted.fp8_index_scores(q_fp8, q_scale, k_fp8, k_scale, w)
    ref = fp8_interpreted.fp8_index_scores_reference(q_fp8, q_scale, k_fp8, k_scale, w)
    bad = torch.zeros_like(got, dtype=torch.bool)
    bad[0, 1, :] = True
    bad[0, :, 17] = True
    assert bool(got[bad].isnan().all())
    torch.testing.assert_close(got[~bad], ref[~bad], rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_gluon_kernel_refuses_what_it_cannot_score(rng):
    """CPU tensors (and, on a GPU, d != 128) are for the Triton kernel: the Gluon entry says so instead of failing
    inside TMA; fp8_index_scores never offers them to it."""
    from topklab.kernels.fp8_index_gluon import fp8_index_scores_gluon, gluon_supports

    args = _inputs(rng, 1, 2, 8, 100, 128)
    assert not gluon_supports(args[0], args[2])
    with pytest.raises(ValueError, match="Hopper"):
        fp8_index_scores_gluon(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["gluon", "triton"])
@pytest.mark.parametrize("b,m,h,n,d", [(16, 4, 64, 131069, 128), (3, 9, 64, 20011, 128), (4, 1, 64, 100003, 128),
                                       (2, 5, 16, 3001, 16)])
def test_kernel_matches_reference_on_gpu(monkeypatch, kernel, b, m, h, n, d):
    """Both CUDA kernels through the public entry point (``TOPKLAB_FP8_GLUON=0`` takes the Triton one; d = 16
    takes it either way)."""
    monkeypatch.setenv("TOPKLAB_FP8_GLUON", "1" if kernel == "gluon" else "0")
    args = _inputs(torch.Generator().manual_seed(5), b, m, h, n, d, device="cuda")
    got, ref = fp8_index_scores(*args), fp8_index_scores_reference(*args)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def _gluon_or_skip(q_fp8, k_fp8):
    from topklab.kernels.fp8_index_gluon import fp8_index_scores_gluon, gluon_supports

    if not gluon_supports(q_fp8, k_fp8):
        pytest.skip("needs Triton with Gluon and a Hopper (sm_90) GPU")
    return fp8_index_scores_gluon


@pytest.mark.gpu
@pytest.mark.parametrize("b,m,h,n", [
    (2, 1, 64, 1000), (2, 3, 64, 4099),  # N % 4 != 0 with b > 1: each sequence's key scales padded for TMA
    (2, 4, 64, 70001), (2, 4, 40, 130),  # several key tiles per program; 40 heads padded to 64
    (1, 5, 128, 777), (3, 3, 128, 1025),  # 128 heads: 2 queries a program
    (2, 9, 64, 3001), (2, 4, 64, 64), (2, 2, 16, 4097), (1, 4, 32, 50),  # partly empty query groups; N < one tile
    (2, 1, 1, 3001), (2, 3, 2, 517),  # lightning-qk's one or two heads (with w = +-1), padded to the table's least
])
def test_gluon_kernel_matches_reference_on_gpu(b, m, h, n):
    """The Gluon kernel: ragged last tiles, sequences whose scales start unaligned, query groups partly empty
    (3, 5, 9 queries), padded heads, every head-count class of its table; fresh inputs per case."""
    args = _inputs(torch.Generator().manual_seed(7 + n), b, m, h, n, 128, device="cuda")
    got = _gluon_or_skip(args[0], args[2])(*args)
    ref = fp8_index_scores_reference(*args)
    assert got.shape == (b, m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


@pytest.mark.gpu
def test_gluon_kernel_turns_negative_scales_into_nan_on_gpu():
    q_fp8, q_scale, k_fp8, k_scale, w = _inputs(torch.Generator().manual_seed(3), 2, 3, 64, 203, 128, device="cuda")
    gluon = _gluon_or_skip(q_fp8, k_fp8)
    q_scale[0, 1, 2] = -q_scale[0, 1, 2]
    k_scale[1, 17] = -k_scale[1, 17]
    got = gluon(q_fp8, q_scale, k_fp8, k_scale, w)
    ref = fp8_index_scores_reference(q_fp8, q_scale, k_fp8, k_scale, w)
    bad = torch.zeros_like(got, dtype=torch.bool)
    bad[0, 1, :] = True
    bad[1, :, 17] = True
    assert bool(got[bad].isnan().all())
    torch.testing.assert_close(got[~bad], ref[~bad], rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
