"""FP8 index scoring for the Lightning indexer: I[m, n] = sum_h w[m, h] * ReLU(q[m, h] . k[n]).

As in DeepSeek-V3.2-Exp: index queries and keys are Hadamard-rotated (outliers spread, q.k unchanged), stored as
FP8 e4m3 with one fp32 scale per 128-element block, and scored on FP8 tensor cores. The torch reference computes
the same sum in fp32 from the FP8 values; the Triton kernel streams each key tile once and scores it against the
index heads of several queries (one or two FP8 products), so it reads 132 bytes per key at d = 128 (plus 4 per score
written).
"""

from __future__ import annotations

import os

import torch

from topklab.kernels._triton import HAS_TRITON, cdiv, launch, next_pow2, pdl_enter, sm_count, tl, triton
from topklab.kernels._triton import use_triton

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
MAX_INDEX_DIM = 128


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of the last dim (a power of two), scale d^-0.5 so q.k is unchanged."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("hadamard_rotate needs a floating-point tensor")
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"hadamard_rotate needs the last dim to be a power of two, got {d}; pad the vectors to "
                         f"{next_pow2(d)} with zeros first")
    y = x.float().reshape(-1, d)
    h = 1
    while h < d:
        pairs = y.view(-1, d // (2 * h), 2, h)
        y = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2).view(-1, d)
        h *= 2
    return (y * d**-0.5).view(x.shape).to(x.dtype)


def quantize_fp8(x: torch.Tensor, block: int = 128, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 values and fp32 scales ``[..., d // block]``, scale = block amax / 448.

    ``pow2_scale`` rounds each scale up to a power of two (DeepSeek's UE8M0 option). An all-zero block gets scale 1.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("quantize_fp8 needs a floating-point tensor")
    d = x.shape[-1]
    if block < 1 or d % block:
        raise ValueError(f"the last dim ({d}) must be a multiple of block ({block}); for d < 128 pass block=d")
    blocks = x.float().reshape(*x.shape[:-1], d // block, block)
    amax = blocks.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    values = (blocks / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return values.reshape(x.shape), scale


def dequantize_fp8(x_fp8: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Back to fp32: each block of ``block`` values times its scale."""
    d = x_fp8.shape[-1]
    if block < 1 or d % block or scale.shape[-1] != d // block:
        raise ValueError(f"x_fp8 has last dim {d} and scale has {scale.shape[-1]} blocks; expected d // block = "
                         f"{d // max(block, 1)} blocks of {block}")
    blocks = x_fp8.float().reshape(*x_fp8.shape[:-1], d // block, block)
    return (blocks * scale.float().unsqueeze(-1)).reshape(x_fp8.shape)


def _check_index_inputs(q_fp8, q_scale, k_fp8, k_scale, weights):
    """Validate shapes/dtypes; return the scales as fp32 without a trailing block dim of 1."""
    for name, t in (("q_fp8", q_fp8), ("k_fp8", k_fp8)):
        if not isinstance(t, torch.Tensor) or t.dtype != FP8_DTYPE:
            raise TypeError(f"{name} must be a torch.float8_e4m3fn tensor (see quantize_fp8), got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if q_fp8.dim() != 4 or k_fp8.dim() != 3:
        raise ValueError(f"expected q_fp8 [B, M, H, d] and k_fp8 [B, N, d], got {tuple(q_fp8.shape)} and "
                         f"{tuple(k_fp8.shape)}")
    B, M, H, d = q_fp8.shape
    if k_fp8.shape[0] != B or k_fp8.shape[2] != d:
        raise ValueError(f"k_fp8 {tuple(k_fp8.shape)} does not match q_fp8 {tuple(q_fp8.shape)}: need "
                         f"[B={B}, N, d={d}]")
    if d > MAX_INDEX_DIM:
        raise ValueError(f"index head dim d = {d} > {MAX_INDEX_DIM}: one scale per row needs d <= 128")
    N = k_fp8.shape[1]
    q_scale = q_scale.squeeze(-1) if q_scale.dim() == 4 and q_scale.shape[-1] == 1 else q_scale
    k_scale = k_scale.squeeze(-1) if k_scale.dim() == 3 and k_scale.shape[-1] == 1 else k_scale
    expected = (("q_scale", q_scale, (B, M, H)), ("k_scale", k_scale, (B, N)), ("weights", weights, (B, M, H)))
    for name, t, shape in expected:
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
        if t.device != q_fp8.device or k_fp8.device != q_fp8.device:
            raise ValueError("q_fp8, q_scale, k_fp8, k_scale and weights must be on one device")
    return q_scale.float(), k_scale.float()


def fp8_index_scores_reference(q_fp8, q_scale, k_fp8, k_scale, weights) -> torch.Tensor:
    """Plain torch, fp32: out[b, m, n] = sum_h w[b,m,h] * ReLU(q_fp8[b,m,h] . k_fp8[b,n] * q_scale * k_scale)."""
    q_scale, k_scale = _check_index_inputs(q_fp8, q_scale, k_fp8, k_scale, weights)
    keys_t = k_fp8.float().transpose(1, 2)  # [B, d, N]
    out = torch.zeros(q_fp8.shape[0], q_fp8.shape[1], k_fp8.shape[1], dtype=torch.float32, device=q_fp8.device)
    for h in range(q_fp8.shape[2]):  # one head at a time keeps memory at O(B M N)
        dots = torch.matmul(q_fp8[:, :, h].float(), keys_t) * q_scale[:, :, h, None] * k_scale[:, None, :]
        out += weights[:, :, h, None].float() * torch.relu(dots)
    return out


def gluon_enabled() -> bool:
    """May CUDA inputs take the Gluon kernel where it fits? Yes unless ``TOPKLAB_FP8_GLUON=0`` (the Triton kernel
    then, e.g. to compare the two, or should a Triton release break Gluon's experimental API)."""
    return os.environ.get("TOPKLAB_FP8_GLUON", "1") != "0"


def fp8_index_scores(q_fp8, q_scale, k_fp8, k_scale, weights) -> torch.Tensor:
    """Same as :func:`fp8_index_scores_reference`: a kernel on CUDA (FP8 tensor cores), torch elsewhere.

    On Hopper with d = 128 and up to 128 heads, the Gluon kernel (:mod:`.fp8_index_gluon`: it overlaps the tensor
    cores with the epilogue, 8% faster on the H100 at 4 queries, tied where memory-bound); otherwise, or with
    ``TOPKLAB_FP8_GLUON=0``, the Triton kernel below (also the CPU interpreter's). Both need scales >= 0 (as
    :func:`quantize_fp8` makes them): they take them out of the ReLU, and a negative scale turns its query's (or
    key's) scores into NaN rather than wrong numbers.
    """
    q_scale, k_scale = _check_index_inputs(q_fp8, q_scale, k_fp8, k_scale, weights)
    if not use_triton(q_fp8) or q_fp8.numel() == 0 or k_fp8.numel() == 0:  # empty: nothing to launch over
        return fp8_index_scores_reference(q_fp8, q_scale, k_fp8, k_scale, weights)
    if gluon_enabled() and q_fp8.device.type == "cuda":
        # imported here: the Gluon module builds on this one
        from topklab.kernels.fp8_index_gluon import gluon_supports, launch_gluon

        if gluon_supports(q_fp8, k_fp8):
            return launch_gluon(q_fp8, q_scale, k_fp8, k_scale, weights)
    q_fp8, k_fp8 = q_fp8.contiguous(), k_fp8.contiguous()
    q_scale, k_scale, weights = q_scale.contiguous(), k_scale.contiguous(), weights.float().contiguous()
    B, M, H, d = q_fp8.shape
    N = k_fp8.shape[1]
    out = torch.empty(B, M, N, dtype=torch.float32, device=q_fp8.device)
    block_h = max(16, next_pow2(H))
    # a program scores the index heads of `queries` queries (up to 256 columns) against each key tile it loads, in
    # two FP8 products of at most 128 columns where it can: measured faster on the H100 than one 256-wide product
    # (fewer live registers, 3 programs per SM) and than separate programs per half (each key tile loaded once)
    queries = max(1, min(next_pow2(M), 2 * MAX_PRODUCT_COLUMNS // block_h))
    products = 2 if queries > 1 and queries * block_h > MAX_PRODUCT_COLUMNS else 1
    block_n, num_warps, num_stages, programs_per_sm = _tile_config(queries * block_h // products, products)
    query_groups = cdiv(M, queries)
    tiles = cdiv(N, block_n)
    # a few programs per SM in all; each scores a run of key tiles against its queries, loaded once
    programs = max(1, min(tiles, programs_per_sm * sm_count(q_fp8.device) // (B * query_groups)))
    tiles_per_program = cdiv(tiles, programs)
    launch(_fp8_index_kernel, (cdiv(tiles, tiles_per_program), query_groups, B),
           (q_fp8, q_scale, k_fp8, k_scale, weights, out, M, N, H, tiles_per_program),
           dict(D=d, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=max(32, next_pow2(d)), QUERIES=queries,
                PRODUCTS=products), num_warps=num_warps, num_stages=num_stages)
    return out


MAX_PRODUCT_COLUMNS = 128  # index heads per FP8 product (all heads of a query in one product when there are more)


def _tile_config(columns: int, products: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, num_warps, num_stages, programs per SM) for ``products`` products of ``columns`` index heads.

    From a sweep on the H100 (2026-11-28, 64 heads, d = 128, batch 16): 4 queries 64 x 4 warps, 4 stages, 3 programs
    per SM (registers allow 3); one query 128 x 4 warps, 3 stages, 8 programs per SM.
    """
    if products == 2:
        return 64, 4, 4, 3
    return (64, 4, 3, 4) if columns > 64 else (128, 4, 3, 8)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["M", "N", "tiles_per_program"])  # the cache grows a key a step: compile once
    def _fp8_index_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, w_ptr, out_ptr, M, N, H, tiles_per_program,
                          D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          QUERIES: tl.constexpr, PRODUCTS: tl.constexpr, PDL: tl.constexpr):
        """A run of key tiles [BLOCK_N, d] of one sequence against the QUERIES x H index heads of a query group.

        The heads of the group's queries are the columns of PRODUCTS (1 or 2) FP8 products per key tile, keys as
        their rows, so the sum over a query's heads runs along each thread's own columns. Since the scales are >= 0,
        w * ReLU(q.k * s_q * s_k) = s_k * (w * s_q) * ReLU(q.k): a max and a fused multiply-add per product
        element, the key scale once per row.
        """
        pdl_enter(PDL)
        pid_n, pid_m, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cols = tl.arange(0, QUERIES * BLOCK_H)  # column j: head j % BLOCK_H of query j // BLOCK_H of the group
        m = pid_m * QUERIES + cols // BLOCK_H
        h = cols % BLOCK_H
        col_ok = (m < M) & (h < H)
        head_row = ((b * M + m) * H + h).to(tl.int64)
        dd = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + head_row[:, None] * D + dd[None, :], mask=col_ok[:, None] & (dd[None, :] < D), other=0.0)
        q_scale = tl.load(qs_ptr + head_row, mask=col_ok, other=0.0)
        head_weight = q_scale * tl.load(w_ptr + head_row, mask=col_ok, other=0.0)
        head_weight = tl.where(q_scale >= 0, head_weight, float("nan"))
        HALF: tl.constexpr = QUERIES // PRODUCTS * BLOCK_H  # columns of one product
        if PRODUCTS == 2:  # the first and second half of the columns, each its own product
            qt_a, qt_b = tl.split(tl.permute(tl.reshape(tl.trans(q), (BLOCK_D, 2, HALF)), (0, 2, 1)))
            weight_a, weight_b = tl.split(tl.permute(tl.reshape(head_weight, (2, HALF)), (1, 0)))
        else:
            qt_a, weight_a = tl.trans(q), head_weight
            qt_b, weight_b = qt_a, weight_a
        rows = tl.arange(0, BLOCK_N)
        first = pid_n * tiles_per_program
        for tile in range(first, tl.minimum(first + tiles_per_program, tl.cdiv(N, BLOCK_N))):
            n = tile * BLOCK_N + rows
            n_ok = n < N
            keys = tl.load(k_ptr + (b * N + n[:, None]).to(tl.int64) * D + dd[None, :],
                           mask=n_ok[:, None] & (dd[None, :] < D), other=0.0)
            k_scale = tl.load(ks_ptr + b * N + n, mask=n_ok, other=0.0)
            k_scale = tl.where(k_scale >= 0, k_scale, float("nan"))
            _score_product(out_ptr, keys, qt_a, weight_a, k_scale, b, pid_m * QUERIES, M, N, n, BLOCK_N, BLOCK_H,
                           QUERIES // PRODUCTS)
            if PRODUCTS == 2:
                _score_product(out_ptr, keys, qt_b, weight_b, k_scale, b, pid_m * QUERIES + QUERIES // 2, M, N, n,
                               BLOCK_N, BLOCK_H, QUERIES // 2)

    @triton.jit
    def _score_product(out_ptr, keys, qt, head_weight, k_scale, b, first_query, M, N, n,
                       BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, QUERIES: tl.constexpr):
        """out[b, m, n] = k_scale[n] * sum over the heads of query m of head_weight * ReLU(keys[n] . qt[:, head])."""
        dots = tl.dot(keys, qt)  # [BLOCK_N, QUERIES * BLOCK_H] fp32, FP8 tensor cores
        weighted = tl.maximum(dots, 0.0) * head_weight[None, :]
        scores = tl.sum(tl.reshape(weighted, (BLOCK_N, QUERIES, BLOCK_H)), axis=2) * k_scale[:, None]
        m = first_query + tl.arange(0, QUERIES)
        tl.store(out_ptr + ((b * M + m).to(tl.int64) * N)[None, :] + n[:, None], scores,
                 mask=(n[:, None] < N) & (m[None, :] < M))
