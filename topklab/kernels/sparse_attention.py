"""Top-k sparse decode attention: softmax over the selected keys only, gathered from the cache.

``sparse_decode_attention`` gathers the selected rows of K and V (flash-decoding: the selection of each row is
split over several programs whose partial softmax states are merged by a second small kernel). ``topk_attention``
is select + attend: with one selection per query head it reuses the scores the selection already computed, so
only V is gathered.
"""

from __future__ import annotations

import torch

from topklab.kernels._triton import HAS_TRITON, cdiv, interpreting, launch, next_pow2, sm_count, tl, triton
from topklab.kernels._triton import pdl_enter, use_triton
from topklab.kernels.topk import _scratch, topk, topk_reference


def sparse_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                            scale: float | None = None) -> torch.Tensor:
    """Attention of ``q [B, Hq, d]`` over the keys ``indices`` picks from ``keys``/``values [B, Hkv, N, d]``.

    ``indices [B, Hq, k]`` selects per query head, ``[B, Hkv, k]`` once per KV head for its query group; -1 entries
    are skipped (a row with none attends to nothing and returns zeros). ``scale`` defaults to d^-0.5.
    Returns ``[B, Hq, d]`` in q's dtype. Triton on CUDA, :func:`sparse_decode_attention_reference` elsewhere.
    Indices must lie in [-1, N): the reference refuses others; the CUDA path skips them (checking would cost a
    device sync per call), so it never reads outside the cache.
    """
    scale = _check_attention(q, keys, values, indices, scale)
    if not use_triton(q):
        return sparse_decode_attention_reference(q, keys, values, indices, scale)
    return _attend(q, keys, values, indices, scale, selected_scores=None)


def sparse_decode_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                      indices: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain torch in fp32: gather, mask the -1 slots, a softmax that returns zeros when nothing is selected."""
    scale = _check_attention(q, keys, values, indices, scale)
    if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= keys.shape[2]):
        raise ValueError(f"indices hold {int(indices.min())}..{int(indices.max())}; valid are 0..N-1 = "
                         f"0..{keys.shape[2] - 1}, or -1 for an empty slot")
    return _attend_reference(q, keys, values, indices, scale)


def _attend_reference(q, keys, values, indices, scale: float) -> torch.Tensor:
    """The reference's math on checked inputs (no host read: a static decode step stays capturable)."""
    b, hq, d = q.shape
    hkv, n_sel = keys.shape[1], indices.shape[1]
    if indices.shape[-1] == 0 or keys.shape[2] == 0:  # nothing selected anywhere
        return q.new_zeros(b, hq, d)
    group = hq // n_sel  # query heads per selection row
    kv_of_sel = torch.arange(n_sel, device=q.device) // (n_sel // hkv)
    safe = indices.clamp(min=0).long()
    batch = torch.arange(b, device=q.device)[:, None, None]
    k_sel = keys[batch, kv_of_sel[None, :, None], safe].float()  # [B, n_sel, k, d]
    v_sel = values[batch, kv_of_sel[None, :, None], safe].float()
    q_rows = q.float().view(b, n_sel, group, d)
    scores = torch.einsum("bsgd,bskd->bsgk", q_rows, k_sel) * scale
    scores = scores.masked_fill((indices < 0)[:, :, None, :], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.einsum("bsgk,bskd->bsgd", weights, v_sel) / total.clamp(min=torch.finfo(torch.float32).tiny)
    return out.reshape(b, hq, d).to(q.dtype)


def topk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, *,
                   scale: float | None = None, lengths: torch.Tensor | None = None,
                   starts: torch.Tensor | None = None, per_kv_head: bool = False) -> torch.Tensor:
    """One Top-k decode step, select + attend: exact Top-k by q.k among each sequence's valid keys
    ``[starts, lengths)`` (see :func:`topk`), softmax over those keys."""
    if not use_triton(keys):
        return topk_attention_reference(q, keys, values, k, scale=scale, lengths=lengths, starts=starts,
                                        per_kv_head=per_kv_head)
    scores, indices = topk(q, keys, k, lengths=lengths, starts=starts, per_kv_head=per_kv_head, sorted=False)
    scale = _check_attention(q, keys, values, indices, scale)
    return _attend(q, keys, values, indices, scale, selected_scores=None if per_kv_head else scores)


def topk_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, *,
                             scale: float | None = None, lengths: torch.Tensor | None = None,
                             starts: torch.Tensor | None = None, per_kv_head: bool = False) -> torch.Tensor:
    _, indices = topk_reference(q, keys, k, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
    return _attend_reference(q, keys, values, indices, _check_attention(q, keys, values, indices, scale))


def _check_attention(q, keys, values, indices, scale) -> float:
    for name, t in (("q", q), ("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if q.dim() != 3 or keys.dim() != 4 or values.shape != keys.shape:
        raise ValueError(f"expected q [B, Hq, d] and keys/values [B, Hkv, N, d] of one shape, got q "
                         f"{tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}")
    b, hq, d = q.shape
    hkv = keys.shape[1]
    if keys.shape[0] != b or keys.shape[3] != d or hkv == 0 or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit keys {tuple(keys.shape)}: same B and d, Hq a multiple "
                         "of Hkv")
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError("indices must be an int32/int64 tensor of key positions (-1 = skip)")
    if indices.dim() != 3 or indices.shape[0] != b or indices.shape[1] not in (hq, hkv):
        raise ValueError(f"indices must be [B, Hq, k] (per query head) or [B, Hkv, k] (per KV head), got "
                         f"{tuple(indices.shape)} for Hq = {hq}, Hkv = {hkv}")
    if len({q.device, keys.device, values.device, indices.device}) != 1:
        raise ValueError("q, keys, values and indices must be on one device")
    return float(d**-0.5 if scale is None else scale)


def _attend(q, keys, values, indices, scale: float, selected_scores: torch.Tensor | None) -> torch.Tensor:
    """Split-k gather attention: partial (max, sum, acc) per split, then a merge."""
    b, hq, d = q.shape
    hkv, n, n_sel, k = keys.shape[1], keys.shape[2], indices.shape[1], indices.shape[2]
    group = hq // n_sel
    if b == 0 or k == 0 or n == 0:  # no sequence, or nothing selected: no launch (a grid may not be empty)
        return q.new_zeros(b, hq, d)
    k3, v3 = keys.reshape(b * hkv, n, d), values.reshape(b * hkv, n, d)
    if k3.stride(-1) != 1 or v3.stride(-1) != 1 or k3.stride() != v3.stride():
        k3, v3 = k3.contiguous(), v3.contiguous()
    q2 = q.reshape(b * hq, d).contiguous()
    idx = indices.reshape(b * n_sel, k).contiguous()
    sel_rows = b * n_sel
    block_k = 64
    splits = max(1, min(cdiv(k, block_k), cdiv(4 * sm_count(q.device), sel_rows)))
    per_split = cdiv(cdiv(k, splits), block_k) * block_k
    splits = cdiv(k, per_split)
    block_m = max(16, next_pow2(group))
    part_max = _scratch(q.device, "part_max", (sel_rows, splits, block_m), torch.float32)
    part_sum = _scratch(q.device, "part_sum", (sel_rows, splits, block_m), torch.float32)
    part_acc = _scratch(q.device, "part_acc", (sel_rows, splits, block_m, d), torch.float32)
    has_scores = selected_scores is not None
    dot_fp32 = interpreting() or q.dtype == torch.float32 or keys.dtype != q.dtype
    launch(_sparse_attention_kernel, (sel_rows, splits),
           (q2, k3, v3, idx, selected_scores.reshape(sel_rows, k) if has_scores else idx, part_max, part_sum,
            part_acc, scale, n, k, group, n_sel // hkv, k3.stride(0), k3.stride(1), per_split, splits),
           dict(D=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_M=block_m, BLOCK_K=block_k, HAS_SCORES=has_scores,
                DOT_FP32=dot_fp32), num_warps=4)
    out = torch.empty(b * hq, d, dtype=q.dtype, device=q.device)
    launch(_merge_kernel, (sel_rows, group), (part_max, part_sum, part_acc, out, group, splits),
           dict(D=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_M=block_m, BLOCK_S=max(2, next_pow2(splits))), num_warps=4)
    return out.view(b, hq, d)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["N"])  # a growing cache changes N every decode step
    def _sparse_attention_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, sel_ptr, pmax_ptr, psum_ptr, pacc_ptr, scale, N, K,
                                 group, sel_per_kv, stride_kl, stride_kn, per_split, splits,
                                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_K: tl.constexpr, HAS_SCORES: tl.constexpr, DOT_FP32: tl.constexpr,
                                 PDL: tl.constexpr):
        """One selection row's query heads over one split of its selected keys: online softmax state."""
        pdl_enter(PDL)
        row, split = tl.program_id(0), tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        dd = tl.arange(0, BLOCK_D)
        m_ok = m < group
        d_ok = dd < D
        q = tl.load(q_ptr + (row * group + m[:, None]).to(tl.int64) * D + dd[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        kv_base = (row // sel_per_kv).to(tl.int64) * stride_kl
        run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        start = split * per_split
        for j0 in range(start, tl.minimum(start + per_split, K), BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            index = tl.load(idx_ptr + row.to(tl.int64) * K + j, mask=j < K, other=-1).to(tl.int64)
            picked = (index >= 0) & (index < N)  # outside the cache: skipped, never read
            offsets = kv_base + index[:, None] * stride_kn + dd[None, :]
            tile_mask = picked[:, None] & d_ok[None, :]
            if HAS_SCORES:
                s = tl.load(sel_ptr + row.to(tl.int64) * K + j, mask=picked, other=0.0) * scale
                s = tl.broadcast_to(s[None, :], (BLOCK_M, BLOCK_K))
            else:
                keys = tl.load(k_ptr + offsets, mask=tile_mask, other=0.0)
                if DOT_FP32:
                    s = tl.dot(q, tl.trans(keys.to(tl.float32)), input_precision="ieee") * scale
                else:
                    s = tl.dot(q, tl.trans(keys)) * scale
            s = tl.where(picked[None, :], s, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(s, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp(s - safe_max[:, None])
            correction = tl.exp(run_max - safe_max)
            vals = tl.load(v_ptr + offsets, mask=tile_mask, other=0.0)
            if DOT_FP32:
                pv = tl.dot(p, vals.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(vals.dtype), vals)
            acc = acc * correction[:, None] + pv
            run_sum = run_sum * correction + tl.sum(p, axis=1)
            run_max = new_max
        part = row.to(tl.int64) * splits + split
        tl.store(pmax_ptr + part * BLOCK_M + m, run_max)
        tl.store(psum_ptr + part * BLOCK_M + m, run_sum)
        tl.store(pacc_ptr + (part * BLOCK_M + m[:, None]) * D + dd[None, :], acc, mask=d_ok[None, :])

    @triton.jit
    def _merge_kernel(pmax_ptr, psum_ptr, pacc_ptr, out_ptr, group, splits, D: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        """Merge the splits' softmax states of one query head of a selection row; zeros where nothing was selected."""
        pdl_enter(PDL)
        row, g = tl.program_id(0), tl.program_id(1)
        sp = tl.arange(0, BLOCK_S)
        dd = tl.arange(0, BLOCK_D)
        base = row.to(tl.int64) * splits
        s_ok = sp < splits
        maxes = tl.load(pmax_ptr + (base + sp) * BLOCK_M + g, mask=s_ok, other=float("-inf"))
        sums = tl.load(psum_ptr + (base + sp) * BLOCK_M + g, mask=s_ok, other=0.0)
        accs = tl.load(pacc_ptr + ((base + sp[:, None]) * BLOCK_M + g) * D + dd[None, :],
                       mask=s_ok[:, None] & (dd[None, :] < D), other=0.0)
        top = tl.max(maxes, axis=0)
        weight = tl.exp(maxes - tl.where(top == float("-inf"), 0.0, top))
        total = tl.sum(weight * sums, axis=0)
        out = tl.sum(weight[:, None] * accs, axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + (row * group + g).to(tl.int64) * D + dd, out.to(out_ptr.dtype.element_ty), mask=dd < D)
