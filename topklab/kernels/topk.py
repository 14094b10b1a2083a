"""Exact Top-k selection for one decode step, near the cost of reading K once.

A few small kernels instead of q.K^T + torch.topk (which reads the scores many times with one block per row):

1. ``_score_kernel`` streams K once (many programs per KV head), scores the G query heads of the group on the
   tensor cores, writes the fp32 scores (4*G bytes per key against 2*d to read the key) and the maximum of every
   block of ``bs`` keys (with large blocks it also adds their top 7 bits to the level-0 histogram, saving a launch).
2. ``_block_histogram_kernel`` (bits 31..25, then 24..18 inside the level-0 bin that holds the k-th largest)
   histograms the block maxima of each row with atomics, which gives a value ``v`` with at least k block maxima
   >= v. Since the blocks are disjoint, at least k keys score >= v: no key of the Top-k is below v, and with >= 4k
   blocks only about 1.15k keys pass.
3. ``_collect_kernel`` reads only the blocks whose maximum is >= v (about a quarter of the scores) and appends
   their keys scoring >= v to a candidate list (one atomic per program), keeping the candidates' key range.
4. ``_finalize_kernel`` (one program per row) finds the exact k-th largest candidate by narrowing radix histograms
   over that range (7 bits a pass, the candidates held in registers; ties go to the lower index), writes the k
   winners and zeroes the row's workspace for the next call.

Scratch buffers (scores, block maxima, candidates, and the workspace of histograms and counters) are kept per device
and stream and reused; the workspace is all zeros between calls, so no memset is launched. Scores and indices come
back unordered unless ``sorted=True`` (a torch sort of the k winners). Scores are compared through an integer key
whose signed order is the float order, so every step is exact.
"""

from __future__ import annotations

import collections
import math

import torch

from topklab.checks import check_k
from topklab.kernels._triton import HAS_TRITON, cdiv, interpreting, launch, next_pow2, tl, triton, use_triton

HIST_BINS = 128  # 7 radix bits a level: the block-maxima levels use bits 31..25 and 24..18
# per row: level-0 and level-1 histograms, candidate count, largest and smallest candidate
WORKSPACE_WIDTH = 2 * HIST_BINS + 3
# the score pass adds block maxima to the level-0 histogram itself (saving a launch) when blocks hold at least this
# many keys: with smaller blocks its atomics cost more than the launch (H100: +6.7 us at N = 8K, blocks of 1)
HIST0_IN_SCORE_MIN_BLOCK = 32
MAX_GROUP_BLOCK = 64  # query rows scored together against one key tile


def topk(q: torch.Tensor, keys: torch.Tensor, k: int, *, lengths: torch.Tensor | None = None,
         per_kv_head: bool = False, sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Top-k keys of one decode step: ``(scores fp32, indices int64)``.

    ``q [B, Hq, d]`` with ``keys [B, Hkv, N, d]`` (GQA: Hq = G * Hkv; output ``[B, Hq, k]``, or ``[B, Hkv, k]`` with
    ``per_kv_head``, which ranks keys by the group's summed scores), or queries already folded per KV head,
    ``q [*, M, d]`` with ``keys [*, N, d]`` (output ``[*, M, k]``). ``lengths [B]`` are the valid keys per sequence;
    rows with fewer than k get index -1 and score -inf in the tail. Ties go to the lower index. ``sorted`` orders
    each row best first; otherwise the order is unspecified. Triton on CUDA, :func:`topk_reference` elsewhere.
    """
    q3, k3, out_shape = _fold(q, keys, per_kv_head)
    check_k(k, k3.shape[1])
    row_lengths = _row_lengths(lengths, keys, k3.shape[0])
    if not use_triton(k3):
        return topk_reference(q, keys, k, lengths=lengths, per_kv_head=per_kv_head)
    scores, indices = _select(q3, k3, k, row_lengths, per_kv_head)
    if sorted:
        scores, indices = _sort_best_first(scores, indices)
    return scores.view(*out_shape, k), indices.view(*out_shape, k)


def topk_reference(q: torch.Tensor, keys: torch.Tensor, k: int, *, lengths: torch.Tensor | None = None,
                   per_kv_head: bool = False, sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: fp32 q.K^T, keys past each length masked, a stable sort (ties to the lower index), the first k."""
    q3, k3, out_shape = _fold(q, keys, per_kv_head)
    check_k(k, k3.shape[1])
    row_lengths = _row_lengths(lengths, keys, k3.shape[0])
    scores = torch.matmul(q3.float(), k3.float().transpose(1, 2))  # [L, M, N]
    if per_kv_head:
        scores = scores.sum(dim=1, keepdim=True)
    if row_lengths is not None:
        positions = torch.arange(k3.shape[1], device=k3.device)
        scores = scores.masked_fill(positions >= row_lengths.view(-1, 1, 1), float("-inf"))
    top_scores, top_idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    top_scores, top_idx = top_scores[..., :k], top_idx[..., :k]
    top_idx = top_idx.masked_fill(top_scores == float("-inf"), -1)
    return top_scores.reshape(*out_shape, k), top_idx.reshape(*out_shape, k)


def _fold(q: torch.Tensor, keys: torch.Tensor, per_kv_head: bool):
    """Queries [L, M, d] and keys [L, N, d] (L = batch x KV heads) plus the output's leading shape."""
    for name, t in (("q", q), ("keys", keys)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if q.device != keys.device:
        raise ValueError(f"q is on {q.device} but keys are on {keys.device}; move both to one device")
    if q.shape[-1] != keys.shape[-1]:
        raise ValueError(f"head dim mismatch: q has d = {q.shape[-1]}, keys have d = {keys.shape[-1]}")
    if keys.dim() < 3:
        raise ValueError(f"keys must be [B, Hkv, N, d] or [*, N, d] with a batch/head dim, got {tuple(keys.shape)}")
    n, d = keys.shape[-2], keys.shape[-1]
    if q.dim() == keys.dim() - 1 and keys.dim() == 4:  # one decode step: q [B, Hq, d], keys [B, Hkv, N, d]
        b, hq, hkv = q.shape[0], q.shape[1], keys.shape[1]
        if q.shape[0] != keys.shape[0] or hq % hkv:
            raise ValueError(f"q {tuple(q.shape)} and keys {tuple(keys.shape)}: need the same batch and Hq a "
                             f"multiple of Hkv (GQA)")
        q3 = q.reshape(b * hkv, hq // hkv, d)
        out_shape = (b, hkv) if per_kv_head else (b, hq)
    elif q.dim() == keys.dim() and q.shape[:-2] == keys.shape[:-2]:  # folded: q [*, M, d], keys [*, N, d]
        q3 = q.reshape(-1, q.shape[-2], d)
        out_shape = (*q.shape[:-2], 1 if per_kv_head else q.shape[-2])
    else:
        raise ValueError(f"q {tuple(q.shape)} does not fit keys {tuple(keys.shape)}: pass q [B, Hq, d] with keys "
                         "[B, Hkv, N, d], or q [*, M, d] with keys [*, N, d]")
    if per_kv_head and q3.shape[1] > MAX_GROUP_BLOCK:
        raise ValueError(f"per_kv_head sums at most {MAX_GROUP_BLOCK} query heads per KV head, got {q3.shape[1]}")
    return q3, keys.reshape(-1, n, d), out_shape


def _row_lengths(lengths: torch.Tensor | None, keys: torch.Tensor, n_lead: int) -> torch.Tensor | None:
    """Valid keys per folded KV row [L] (int32), from per-sequence ``lengths [B]``."""
    if lengths is None:
        return None
    b = keys.shape[0]
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != b:
        raise ValueError(f"lengths must be a 1-D tensor of {b} per-sequence key counts")
    if lengths.dtype.is_floating_point or lengths.device != keys.device:
        raise ValueError("lengths must be an integer tensor on the keys' device")
    return lengths.to(torch.int32).clamp(0, keys.shape[-2]).repeat_interleave(n_lead // b)


def _sort_best_first(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order rows by score descending, ties by index ascending (-1 padding, scored -inf, last): one sort of a
    packed int64 key (the float's order-preserving bits, then the complemented index)."""
    bits = scores.view(torch.int32)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()
    order = ((key << 32) | (0xFFFFFFFF - indices.clamp(min=0))).argsort(dim=-1, descending=True)
    return scores.gather(-1, order), indices.gather(-1, order)


def _select(q3: torch.Tensor, k3: torch.Tensor, k: int, row_lengths: torch.Tensor | None, per_kv_head: bool):
    """The launches. Returns unordered ``scores [R, k]`` and ``indices [R, k]`` (R = output rows)."""
    if k3.stride(-1) != 1:
        k3 = k3.contiguous()
    q3 = q3.contiguous()
    n_lead, m, d = q3.shape
    n = k3.shape[1]
    rows = n_lead if per_kv_head else n_lead * m
    rows_per_kv = rows // n_lead
    device = k3.device
    block_n = 64 if k3.dtype == torch.float32 else 128
    block_m = max(16, next_pow2(min(m, MAX_GROUP_BLOCK)))
    m_blocks = cdiv(m, block_m)
    # >= 4k blocks (so ~1.15k candidates), at most one tile per block
    block_size = max(1, min(block_n, _prev_pow2(n // (4 * k)) if n >= 4 * k else 1))
    n_blocks = cdiv(n, block_size)
    # row strides padded to 16 so that Triton's divisibility specialisation stays fixed as N grows while decoding
    # (N itself is not specialised): one compilation per configuration, vectorised row accesses
    row_stride, bmax_stride = _round16(n), _round16(n_blocks)
    splits = max(1, min(cdiv(n, block_n), cdiv(4 * _sm_count(device), n_lead * m_blocks)))
    per_split = cdiv(cdiv(n, splits), block_n) * block_n
    has_lengths = row_lengths is not None
    lengths_arg = row_lengths if has_lengths else q3  # unused pointer when there are no lengths
    dot_fp32 = k3.dtype == torch.float32 or q3.dtype == torch.float32 or interpreting() or q3.dtype != k3.dtype

    scores = _scratch(device, "scores", (rows, row_stride), torch.float32)
    block_max = _scratch(device, "block_max", (rows, bmax_stride), torch.float32)
    candidates = _scratch(device, "candidates", (rows, row_stride), torch.int64)
    workspace = _scratch(device, "workspace", (rows, WORKSPACE_WIDTH), torch.int32, zeroed=True)
    out_scores = torch.empty(rows, k, dtype=torch.float32, device=device)
    out_indices = torch.empty(rows, k, dtype=torch.int64, device=device)
    block_t, block_c = 2048, 4096
    hist0_in_score = block_size >= HIST0_IN_SCORE_MIN_BLOCK
    # with blocks of one key, "only the blocks reaching the threshold" is every key: read the scores once
    skip = block_size > 1
    try:
        launch(_score_kernel, (n_lead * m_blocks, cdiv(n, per_split)),
               (q3, k3, lengths_arg, scores, block_max, workspace, n, m, k3.stride(0), k3.stride(1), per_split,
                n_blocks, row_stride, bmax_stride),
               dict(D=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_M=block_m, BLOCK_N=block_n, BS=block_size,
                    NB=HIST_BINS, REDUCE_GROUP=per_kv_head, DOT_FP32=dot_fp32, HAS_LENGTHS=has_lengths,
                    HIST0=hist0_in_score),
               num_warps=8 if block_n == 128 else 4)
        for level in (1,) if hist0_in_score else (0, 1):
            launch(_block_histogram_kernel, (rows, cdiv(n_blocks, block_t)),
                   (block_max, lengths_arg, workspace, n, n_blocks, bmax_stride, k, rows_per_kv),
                   dict(LEVEL=level, BS=block_size, NB=HIST_BINS, BLOCK_T=block_t, HAS_LENGTHS=has_lengths),
                   num_warps=8)
        launch(_collect_kernel, (rows, cdiv(n, block_c)),
               (scores, block_max if skip else scores, lengths_arg, workspace, candidates, n, row_stride,
                bmax_stride if skip else row_stride, k, rows_per_kv),
               dict(BS=block_size if skip else 1, NB=HIST_BINS, BLOCK_C=block_c, HAS_LENGTHS=has_lengths),
               num_warps=8)
        launch(_finalize_kernel, (rows,),
               (candidates, workspace, lengths_arg, out_scores, out_indices, n, row_stride, k, rows_per_kv),
               dict(NB=HIST_BINS, BLOCK_F=min(4096, max(256, next_pow2(2 * k))), HAS_LENGTHS=has_lengths),
               num_warps=8)
    except BaseException:
        _SCRATCH.get(_scratch_key(device), {}).pop("workspace", None)  # a failed launch can leave it dirty
        raise
    return out_scores, out_indices


_SCRATCH: collections.OrderedDict[tuple, dict[str, torch.Tensor]] = collections.OrderedDict()
SCRATCH_STREAMS = 4  # buffers are kept for this many (device, stream) pairs, the least recently used dropped


def _scratch_key(device: torch.device) -> tuple:
    # the raw stream handle, as Triton reads it (a torch.cuda.Stream object costs microseconds per call)
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    return device, stream


def _scratch(device: torch.device, name: str, shape: tuple[int, ...], dtype: torch.dtype,
             zeroed: bool = False) -> torch.Tensor:
    """A buffer of ``shape`` reused by every call on this device and stream (calls on one stream run in order, so
    they never use it at the same time): a decode loop allocates nothing per step and keeps the caching allocator
    from splitting the KV cache's large blocks. It grows with headroom as the context grows. ``zeroed`` buffers
    start all zeros and the kernels leave them so (see `_finalize_kernel`)."""
    key = _scratch_key(device)
    buffers = _SCRATCH.setdefault(key, {})
    _SCRATCH.move_to_end(key)
    while len(_SCRATCH) > SCRATCH_STREAMS:
        _SCRATCH.popitem(last=False)  # freed on its own stream's order, as any tensor
    numel = math.prod(shape)
    buffer = buffers.get(name)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        size = max(numel, 1) if zeroed else numel + numel // 8 + 4096
        buffer = (torch.zeros if zeroed else torch.empty)(size, dtype=dtype, device=device)
        buffers[name] = buffer
    return buffer[:numel].view(shape)


def clear_scratch() -> None:
    """Free the reused buffers of every device and stream (they hold ~16 bytes per key and query row)."""
    _SCRATCH.clear()


def _round16(x: int) -> int:
    return (x + 15) // 16 * 16


def _prev_pow2(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one by one: few, larger programs are faster there


if HAS_TRITON:

    @triton.jit
    def _ordered_key(x):
        """fp32 -> int32 whose signed order is the float order (-0.0 folded onto +0.0)."""
        bits = (x + 0.0).to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _key_to_float(key):
        return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)

    @triton.jit
    def _row_length(len_ptr, row, rows_per_kv, N, HAS_LENGTHS: tl.constexpr):
        length = N
        if HAS_LENGTHS:
            length = tl.load(len_ptr + row // rows_per_kv)
        return length

    @triton.jit
    def _pick_bin(hist, need, NB: tl.constexpr):
        """The bin (counting from the top) holding the need-th largest: (bin, need left inside it, its count)."""
        bins = tl.arange(0, NB)
        above = tl.cumsum(hist, axis=0, reverse=True) - hist
        b = tl.max(tl.where(above + hist >= need, bins, -1), axis=0)
        above_b = tl.sum(tl.where(bins == b, above, 0), axis=0)
        in_bin = tl.sum(tl.where(bins == b, hist, 0), axis=0)
        return b.to(tl.int64), need - above_b, in_bin

    @triton.jit
    def _row_threshold(ws_ptr, row, need, valid_blocks, NB: tl.constexpr):
        """Key v with >= need block maxima >= v, from the two 7-bit radix histograms of the row."""
        bins = tl.arange(0, NB)
        hist0 = tl.load(ws_ptr + row * (2 * NB + 3) + bins)
        hist1 = tl.load(ws_ptr + row * (2 * NB + 3) + NB + bins)
        b0, need1, _ = _pick_bin(hist0, need, NB)
        b1, _, _ = _pick_bin(hist1, need1, NB)
        threshold = ((b0 << 25) | (b1 << 18)) - 2147483648
        # too few blocks to bound anything (or nothing to select): every valid key is a candidate
        return tl.where((valid_blocks < need) | (need == 0), -2147483648, threshold)

    @triton.jit(do_not_specialize=["N", "n_blocks"])
    def _score_kernel(q_ptr, k_ptr, len_ptr, s_ptr, bmax_ptr, ws_ptr, N, M, stride_kl, stride_kn, per_split,
                      n_blocks, row_stride, bmax_stride,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BS: tl.constexpr, NB: tl.constexpr, REDUCE_GROUP: tl.constexpr, DOT_FP32: tl.constexpr,
                      HAS_LENGTHS: tl.constexpr, HIST0: tl.constexpr):
        """Scores of BLOCK_M query rows of one KV row against a span of keys, per-block maxima, and the level-0
        radix histogram of the block maxima (bits 31..25, one atomic per valid block)."""
        pid, split = tl.program_id(0), tl.program_id(1)
        m_blocks = tl.cdiv(M, BLOCK_M)
        lead, mb = pid // m_blocks, pid % m_blocks
        m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        dd = tl.arange(0, BLOCK_D)
        m_ok = m < M
        q = tl.load(q_ptr + (lead * M + m[:, None]).to(tl.int64) * D + dd[None, :],
                    mask=m_ok[:, None] & (dd[None, :] < D), other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        length = _row_length(len_ptr, lead, 1, N, HAS_LENGTHS)
        valid_blocks = tl.cdiv(length, BS)
        key_base = k_ptr + lead.to(tl.int64) * stride_kl
        start = split * per_split
        for n0 in range(start, tl.minimum(start + per_split, N), BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            keys = tl.load(key_base + n[:, None].to(tl.int64) * stride_kn + dd[None, :],
                           mask=(n[:, None] < N) & (dd[None, :] < D), other=0.0, eviction_policy="evict_first")
            if DOT_FP32:
                s = tl.dot(q, tl.trans(keys.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(keys))
            valid = n < length
            blk = n0 // BS + tl.arange(0, BLOCK_N // BS)
            if REDUCE_GROUP:
                summed = tl.where(valid, tl.sum(tl.where(m_ok[:, None], s, 0.0), axis=0), float("-inf"))
                tl.store(s_ptr + lead.to(tl.int64) * row_stride + n, summed, mask=n < N)
                bmax = tl.max(tl.reshape(summed, (BLOCK_N // BS, BS)), axis=1)
                tl.store(bmax_ptr + lead.to(tl.int64) * bmax_stride + blk, bmax, mask=blk < n_blocks)
                if HIST0:
                    tl.atomic_add(ws_ptr + lead * (2 * NB + 3) + (_ordered_key(bmax) >> 25) + NB // 2, 1,
                                  mask=blk < valid_blocks, sem="relaxed")
            else:
                s = tl.where(valid[None, :], s, float("-inf"))
                rows = (lead * M + m).to(tl.int64)
                tl.store(s_ptr + rows[:, None] * row_stride + n[None, :], s, mask=m_ok[:, None] & (n[None, :] < N))
                bmax = tl.max(tl.reshape(s, (BLOCK_M, BLOCK_N // BS, BS)), axis=2)
                tl.store(bmax_ptr + rows[:, None] * bmax_stride + blk[None, :], bmax,
                         mask=m_ok[:, None] & (blk[None, :] < n_blocks))
                if HIST0:
                    tl.atomic_add(ws_ptr + rows[:, None] * (2 * NB + 3) + (_ordered_key(bmax) >> 25) + NB // 2, 1,
                                  mask=m_ok[:, None] & (blk[None, :] < valid_blocks), sem="relaxed")

    @triton.jit(do_not_specialize=["N", "n_blocks"])
    def _block_histogram_kernel(bmax_ptr, len_ptr, ws_ptr, N, n_blocks, bmax_stride, k, rows_per_kv,
                                LEVEL: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr, BLOCK_T: tl.constexpr,
                                HAS_LENGTHS: tl.constexpr):
        """Level-1 radix histogram of a span of block maxima: bits 24..18 of those inside the level-0 bin that
        holds the k-th largest, added into the row's histogram with atomics."""
        row, part = tl.program_id(0), tl.program_id(1)
        length = _row_length(len_ptr, row, rows_per_kv, N, HAS_LENGTHS)
        need = tl.minimum(k, length)
        valid_blocks = tl.cdiv(length, BS)
        i = part * BLOCK_T + tl.arange(0, BLOCK_T)
        key = _ordered_key(tl.load(bmax_ptr + row.to(tl.int64) * bmax_stride + i, mask=i < valid_blocks,
                                   other=0.0))
        if LEVEL == 0:
            ok = (i < valid_blocks) & (valid_blocks >= need)
            bins = (key >> 25) + NB // 2
        else:
            b0, _, _ = _pick_bin(tl.load(ws_ptr + row * (2 * NB + 3) + tl.arange(0, NB)), need, NB)
            ok = (i < valid_blocks) & ((key >> 25) + NB // 2 == b0) & (valid_blocks >= need)
            bins = (key >> 18) & (NB - 1)
        hist = tl.histogram(tl.where(ok, bins, 0), NB, mask=ok)
        target = ws_ptr + row * (2 * NB + 3) + LEVEL * NB + tl.arange(0, NB)
        tl.atomic_add(target, hist, mask=hist > 0, sem="relaxed")

    @triton.jit(do_not_specialize=["N"])
    def _collect_kernel(s_ptr, bmax_ptr, len_ptr, ws_ptr, cand_ptr, N, row_stride, bmax_stride, k, rows_per_kv,
                        BS: tl.constexpr, NB: tl.constexpr, BLOCK_C: tl.constexpr, HAS_LENGTHS: tl.constexpr):
        """Append (key << 32 | index) of every valid key scoring >= the row's threshold, reading only the blocks
        whose maximum reaches it (one atomic a program), and the range of the row's candidate keys."""
        row, part = tl.program_id(0), tl.program_id(1)
        length = _row_length(len_ptr, row, rows_per_kv, N, HAS_LENGTHS)
        need = tl.minimum(k, length)
        valid_blocks = tl.cdiv(length, BS)
        threshold = _row_threshold(ws_ptr, row, need, valid_blocks, NB)
        base = row.to(tl.int64) * row_stride
        blk = part * (BLOCK_C // BS) + tl.arange(0, BLOCK_C // BS)
        blk_ok = blk < valid_blocks
        bkey = _ordered_key(tl.load(bmax_ptr + row.to(tl.int64) * bmax_stride + blk, mask=blk_ok, other=0.0))
        n = blk[:, None] * BS + tl.arange(0, BS)[None, :]  # [blocks, BS]: only blocks that can hold a candidate
        ok = (blk_ok & (bkey >= threshold))[:, None] & (n < length)
        key = _ordered_key(tl.load(s_ptr + base + n, mask=ok, other=0.0))
        take = (ok & (key >= threshold)).to(tl.int32)
        per_block = tl.sum(take, axis=1)
        count = tl.sum(per_block, axis=0)
        ws_row = ws_ptr + row * (2 * NB + 3)
        first = tl.atomic_add(ws_row + 2 * NB, count, mask=count > 0)
        # the row's largest and smallest candidate (the finalize's first range), as unsigned maxima so that the
        # zeroed workspace is their neutral value
        largest = tl.max(tl.max(tl.where(take > 0, key, -2147483648), axis=1), axis=0)
        smallest = tl.min(tl.min(tl.where(take > 0, key, 2147483647), axis=1), axis=0)
        bounds = (ws_row + 2 * NB + 1).to(tl.pointer_type(tl.uint32), bitcast=True)
        tl.atomic_max(bounds, (largest ^ -2147483648).to(tl.uint32, bitcast=True), mask=count > 0, sem="relaxed")
        tl.atomic_max(bounds + 1, ((~smallest) ^ -2147483648).to(tl.uint32, bitcast=True), mask=count > 0,
                      sem="relaxed")
        slot = first + (tl.cumsum(per_block, axis=0) - per_block)[:, None] + tl.cumsum(take, axis=1) - 1
        tl.store(cand_ptr + base + slot, (key.to(tl.int64) << 32) | n, mask=take > 0)

    @triton.jit(do_not_specialize=["N"])
    def _finalize_kernel(cand_ptr, ws_ptr, len_ptr, out_s_ptr, out_i_ptr, N, row_stride, k, rows_per_kv,
                         NB: tl.constexpr, BLOCK_F: tl.constexpr, HAS_LENGTHS: tl.constexpr):
        """One program per row: the row's exact Top-k from its candidates, then its workspace row zeroed again
        for the next call (every other launch of this call is done with it)."""
        row = tl.program_id(0)
        ws_row = ws_ptr + row * (2 * NB + 3)
        length = _row_length(len_ptr, row, rows_per_kv, N, HAS_LENGTHS)
        hi = (tl.load(ws_row + 2 * NB + 1) ^ -2147483648).to(tl.int64)
        lo = (~(tl.load(ws_row + 2 * NB + 2) ^ -2147483648)).to(tl.int64)
        _finalize_row(cand_ptr + row.to(tl.int64) * row_stride, tl.load(ws_row + 2 * NB), lo, hi,
                      tl.minimum(k, length), k, N, out_s_ptr + row.to(tl.int64) * k,
                      out_i_ptr + row.to(tl.int64) * k, NB, BLOCK_F)
        clear = tl.arange(0, 2 * NB)
        tl.store(ws_row + clear, tl.zeros_like(clear))
        tl.store(ws_row + 2 * NB + tl.arange(0, 4), tl.zeros((4,), tl.int32), mask=tl.arange(0, 4) < 3)

    @triton.jit
    def _candidate_histogram(packed, ok, phase, tie_key, lo, hi, shift, NB: tl.constexpr):
        """Histogram of one chunk of candidates over [lo, hi] in NB bins of 2**shift (phase 1: ties by -index)."""
        key = packed >> 32
        sort_key = tl.where(phase == 0, key, -(packed & 0xFFFFFFFF))
        ok = ok & ((phase == 0) | (key == tie_key)) & (sort_key >= lo) & (sort_key <= hi)
        return tl.histogram(tl.where(ok, (sort_key - lo) >> shift, 0).to(tl.int32), NB, mask=ok)

    @triton.jit
    def _write_winners(packed, ok, cut_key, cut_index, written, out_s_ptr, out_i_ptr):
        key = packed >> 32
        index = packed & 0xFFFFFFFF
        win = ok & ((key > cut_key) | ((key == cut_key) & (index <= cut_index)))
        slot = written + tl.cumsum(win.to(tl.int32), axis=0) - 1
        tl.store(out_s_ptr + slot, _key_to_float(key.to(tl.int32)), mask=win)
        tl.store(out_i_ptr + slot, index, mask=win)
        return written + tl.sum(win.to(tl.int32), axis=0)

    @triton.jit
    def _finalize_row(cand_ptr, count, lo, hi, k_eff, k, N, out_s_ptr, out_i_ptr, NB: tl.constexpr,
                      BLOCK_F: tl.constexpr):
        """Exact Top-k of a row's ``count`` candidates, whose keys lie in [lo, hi]: narrow the range by radix
        histograms until the cut is known, then write the winners (and -inf / -1 past k_eff). The first
        BLOCK_F candidates (usually all of them) stay in registers for every pass."""
        offs = tl.arange(0, BLOCK_F)
        resident = tl.load(cand_ptr + offs, mask=offs < count, other=0)
        need = k_eff.to(tl.int64)
        # phase 0 narrows on the score key; phase 1 breaks a tie at key == tie_key by lowest index (key2 = -index)
        phase = tl.full((), 0, tl.int32)
        tie_key = tl.full((), 0, tl.int64)
        cut_key = lo - 1  # winners: key > cut_key, or key == cut_key and index <= cut_index
        cut_index = tl.full((), -1, tl.int64)
        done = need <= 0
        steps = tl.full((), 0, tl.int32)
        while (~done) & (steps < 80):
            shift = tl.full((), 0, tl.int64)
            while ((hi - lo) >> shift) >= NB:
                shift += 1
            hist = _candidate_histogram(resident, offs < count, phase, tie_key, lo, hi, shift, NB)
            for i0 in range(BLOCK_F, count, BLOCK_F):
                packed = tl.load(cand_ptr + i0 + offs, mask=i0 + offs < count, other=0)
                hist += _candidate_histogram(packed, i0 + offs < count, phase, tie_key, lo, hi, shift, NB)
            b, need, in_bin = _pick_bin(hist, need, NB)
            new_lo = lo + (b << shift)
            new_hi = tl.minimum(hi, new_lo + (tl.full((), 1, tl.int64) << shift) - 1)
            done = in_bin == need
            tie = (~done) & (new_lo == new_hi) & (phase == 0)
            cut_key = tl.where(done, tl.where(phase == 0, new_lo - 1, tie_key), cut_key)
            cut_index = tl.where(done & (phase == 1), -new_lo, cut_index)
            tie_key = tl.where(tie, new_lo, tie_key)
            lo = tl.where(tie, -(N - 1), new_lo)
            hi = tl.where(tie, 0, new_hi)
            phase = tl.where(tie, 1, phase)
            steps += 1
        to_write = tl.where(k_eff > 0, count, 0)
        written = _write_winners(resident, offs < to_write, cut_key, cut_index, tl.full((), 0, tl.int32), out_s_ptr,
                                 out_i_ptr)
        for i0 in range(BLOCK_F, to_write, BLOCK_F):
            packed = tl.load(cand_ptr + i0 + offs, mask=i0 + offs < count, other=0)
            written = _write_winners(packed, i0 + offs < count, cut_key, cut_index, written, out_s_ptr, out_i_ptr)
        for j0 in range(k_eff, k, BLOCK_F):
            pad = j0 + offs < k
            tl.store(out_s_ptr + j0 + offs, float("-inf"), mask=pad)
            tl.store(out_i_ptr + j0 + offs, -1, mask=pad)
