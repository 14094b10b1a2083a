"""FP8 index scoring for the Lightning indexer: I[m, n] = sum_h w[m, h] * ReLU(q[m, h] . k[n]).

As in DeepSeek-V3.2-Exp: index queries and keys are Hadamard-rotated (outliers spread, q.k unchanged), stored as
FP8 e4m3 with one fp32 scale per 128-element block, and scored on FP8 tensor cores. The torch reference computes
the same sum in fp32 from the FP8 values; the Triton kernel streams each key tile once and runs one FP8 dot per
query of the tile (all index heads of a query in one tile), so it reads 132 bytes per key at d = 128.
"""

from __future__ import annotations

import torch

from topklab.kernels._triton import HAS_TRITON, cdiv, launch, next_pow2, tl, triton, use_triton

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


def fp8_index_scores(q_fp8, q_scale, k_fp8, k_scale, weights) -> torch.Tensor:
    """Same as :func:`fp8_index_scores_reference`: the Triton kernel on CUDA (FP8 tensor cores), torch elsewhere."""
    q_scale, k_scale = _check_index_inputs(q_fp8, q_scale, k_fp8, k_scale, weights)
    if not use_triton(q_fp8):
        return fp8_index_scores_reference(q_fp8, q_scale, k_fp8, k_scale, weights)
    q_fp8, k_fp8 = q_fp8.contiguous(), k_fp8.contiguous()
    q_scale, k_scale, weights = q_scale.contiguous(), k_scale.contiguous(), weights.float().contiguous()
    B, M, H, d = q_fp8.shape
    N = k_fp8.shape[1]
    out = torch.empty(B, M, N, dtype=torch.float32, device=q_fp8.device)
    block_n, queries_per_program = 128, 8 if M >= 8 else M
    launch(_fp8_index_kernel, (cdiv(N, block_n), cdiv(M, queries_per_program), B),
           (q_fp8, q_scale, k_fp8, k_scale, weights, out, M, N, H, d),
           dict(BLOCK_H=max(16, next_pow2(H)), BLOCK_N=block_n, BLOCK_D=max(32, next_pow2(d)),
                QUERIES_PER_PROGRAM=queries_per_program), num_warps=4)
    return out


if HAS_TRITON:

    @triton.jit(do_not_specialize=["M", "N"])  # the index cache grows by one key a decode step: compile once
    def _fp8_index_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, w_ptr, out_ptr, M, N, H, D,
                          BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          QUERIES_PER_PROGRAM: tl.constexpr):
        """One key tile [BLOCK_N, d] per program, loaded once and scored against QUERIES_PER_PROGRAM queries."""
        pid_n, pid_m, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dd = tl.arange(0, BLOCK_D)
        hh = tl.arange(0, BLOCK_H)
        n_ok = n < N
        keys = tl.load(k_ptr + (b * N + n[:, None]).to(tl.int64) * D + dd[None, :],
                       mask=n_ok[:, None] & (dd[None, :] < D), other=0.0)
        k_scale = tl.load(ks_ptr + b * N + n, mask=n_ok, other=0.0)
        for i in range(QUERIES_PER_PROGRAM):
            m = pid_m * QUERIES_PER_PROGRAM + i
            row = (b * M + m).to(tl.int64)
            h_ok = (hh < H) & ((hh * 0 + m) < M)
            q = tl.load(q_ptr + (row * H + hh[:, None]) * D + dd[None, :], mask=h_ok[:, None] & (dd[None, :] < D),
                        other=0.0)
            q_scale = tl.load(qs_ptr + row * H + hh, mask=h_ok, other=0.0)
            w = tl.load(w_ptr + row * H + hh, mask=h_ok, other=0.0)
            # keys as the rows of the product: the sum over heads runs along each thread's own columns (plus a
            # few lane shuffles) instead of across warps through shared memory
            dots = tl.dot(keys, tl.trans(q))  # [BLOCK_N, BLOCK_H] fp32, FP8 tensor cores
            head_scores = tl.maximum(dots * k_scale[:, None] * q_scale[None, :], 0.0) * w[None, :]
            tl.store(out_ptr + row * N + n, tl.sum(head_scores, axis=1), mask=n_ok & ((n * 0 + m) < M))
