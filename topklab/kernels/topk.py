"""Exact Top-k selection for one decode step, near the cost of reading K once.

Four kernels instead of q.K^T + torch.topk (which writes the scores, then reads them many times with one block per
row):

1. ``_sample_kernel`` scores a stratified sample of SAMPLE keys of each row (one per stratum, at a hashed offset;
   every valid key when the row holds at most SAMPLE; an eighth of a short row's keys, see ``_sample_size``), many
   programs per row.
2. ``_threshold_kernel`` (one program per row) takes a value ``t`` that about ``lam + 5 sqrt(lam) + 5`` samples
   reach (lam = the expected number of the row's top k in the sample): with overwhelming probability at least k
   keys score >= t, and about 1.2-3k of them do. Fully sampled rows: at least k keys reach t, always.
3. ``_score_kernel`` streams K once (many programs per KV head), scores the G query heads of the group on the
   tensor cores and appends only the keys scoring >= t to the row's candidates (an atomic per candidate, on a
   counter with a cache line of its own; where a sixteenth of the keys or more pass and the rows fit one wave, on
   four counters, each filling its own segment of the row: see ``_sublists``, ``_slots``). No score is written:
   the pass moves K's bytes and little else.
4. ``_finalize_kernel`` (one program per row) finds the exact k-th largest candidate by narrowing radix histograms
   over [t, largest candidate] (7 bits a pass, the candidates held in registers; after the first pass usually over
   the few hundred left in the cut's bin alone, copied out; ties go to the lower index),
   writes the k winners and zeroes the row's workspace for the next call. Rows of many candidates (large k) are
   first cut by many programs each: ``_histogram_kernel`` counts them in 2048 bins, ``_route_kernel`` writes those
   above the cut's bin as winners and copies the cut's bin out, and the finalize narrows that bin alone. Where
   fewer than k keys reached t (a 5-sigma miss, or inputs built against the sample), the finalize rescans the row
   and selects among every key: slower, still exact, since the candidates are exactly the keys >= t whatever the
   sample's numerics.

Scratch buffers (samples, thresholds, candidates, the workspace of counters) are kept per device and stream and
reused; the workspace is all zeros between calls, so no memset is launched. Scores and indices come back unordered
unless ``sorted=True`` (one more launch sorts rows of up to 512 winners in registers, or 2048 in one wave of
programs; torch sorts longer rows). Scores are compared through an integer key whose signed
order is the float order. Valid keys may be a range ``[start, end)`` per sequence (left padding), read on the device.
"""

from __future__ import annotations

import collections
import math

import torch

from topklab.checks import check_finite, check_k
from topklab.kernels._triton import HAS_TRITON, cdiv, interpreting, launch, next_pow2, sm_count, tl, triton
from topklab.kernels._triton import pdl_enter, pdl_release, pdl_wait, prefetch_l2, use_triton

HIST_BINS = 128  # 7 radix bits a finalize pass
# per row: candidate count, largest candidate key (both zero between calls), padded to a 128-byte line of its own:
# the count takes an atomic per candidate, and counters sharing a line serialise each other (H100: up to 2x slower)
LINE_INTS = 32
# rows where many keys pass keep their candidates in SUBLISTS segments, each with its own counter on its own line:
# every candidate is an atomic on its row's counter, and one counter per row serialises them (see _sublists)
SUBLISTS = 4
WORKSPACE_WIDTH = LINE_INTS * SUBLISTS
SAMPLE = 4096  # keys sampled per row to place its candidate threshold (fewer for short rows: _sample_size)
SHORT_SAMPLE = 1024
SHORT_ROW = 32768  # rows of at most this many keys: one wave of score programs
# the threshold's rank among the samples: lam + SAMPLE_SIGMAS * sqrt(lam) + SAMPLE_SLACK (see _sample_rank)
SAMPLE_SIGMAS, SAMPLE_SLACK = 5.0, 5.0
THRESHOLD_WARPS = 4  # the bisection over one row's samples (1 and 4 warps measured within 3% on the H100)
MAX_GROUP_BLOCK = 64  # query rows scored together against one key tile
FINALIZE_BLOCK_CAP = 4096  # the most candidates the finalize holds in registers (see _finalize_block)
CUT_BLOCK = 512  # the finalize's passes after the first run over the cut's bin alone when it holds at most this many
# rows of many candidates are finalized in parts (_histogram_kernel, _route_kernel; see _split_finalize): one
# 2048-bin histogram by many programs per row, winners above the cut's bin written by as many, the finalize left
# with the cut's bin alone (at most CUT_CAP candidates, else it takes the whole row as before)
SPLIT_FROM, SPLIT_ALWAYS_FROM = 4096, 32768
WIDE_BINS = 2048
CUT_CAP = 2048
ROUTE_BLOCK = 1024  # candidates a histogram or route program reads per step
PREFETCH_TILES = 2  # key tiles a score program asks L2 for before it waits for the thresholds (see _score_kernel)


def topk(q: torch.Tensor, keys: torch.Tensor, k: int, *, lengths: torch.Tensor | None = None,
         starts: torch.Tensor | None = None, per_kv_head: bool = False,
         sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Top-k keys of one decode step: ``(scores fp32, indices int64)``.

    ``q [B, Hq, d]`` with ``keys [B, Hkv, N, d]`` (GQA: Hq = G * Hkv; output ``[B, Hq, k]``, or ``[B, Hkv, k]`` with
    ``per_kv_head``, which ranks keys by the group's summed scores), or queries already folded per KV head,
    ``q [*, M, d]`` with ``keys [*, N, d]`` (output ``[*, M, k]``). Each sequence's valid keys are the positions
    ``[starts[b], lengths[b])`` (``starts`` for left padding; either may be None: 0 / N); both may stay on the
    device, so a decode step reads nothing on the host. Rows with fewer than k valid keys get index -1 and score
    -inf in the tail. Ties go to the lower index. ``sorted`` orders
    each row best first; otherwise the order is unspecified. Triton on CUDA, :func:`topk_reference` elsewhere.
    The reference refuses NaN/Inf keys when every key is valid (no ``lengths`` or ``starts``); the CUDA path does
    not scan for them (that would be a second pass over K), and with them a selection is undefined: check a cache
    you do not trust with ``topklab.checks.check_finite``.
    """
    q3, k3, out_shape = _fold(q, keys, per_kv_head)
    check_k(k, k3.shape[1])
    bounds = _sequence_bounds(starts, lengths, keys)
    if not use_triton(k3):
        return topk_reference(q, keys, k, lengths=lengths, starts=starts, per_kv_head=per_kv_head)
    scores, indices = _select(q3, k3, k, bounds, keys.shape[0], per_kv_head)
    if sorted:
        scores, indices = _sort_rows(scores, indices)
    return scores.view(*out_shape, k), indices.view(*out_shape, k)


def topk_reference(q: torch.Tensor, keys: torch.Tensor, k: int, *, lengths: torch.Tensor | None = None,
                   starts: torch.Tensor | None = None, per_kv_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: fp32 q.K^T, keys outside [start, length) masked, a stable sort (ties to the lower index), the
    first k, best first."""
    q3, k3, out_shape = _fold(q, keys, per_kv_head)
    check_k(k, k3.shape[1])
    if starts is None and lengths is None:  # with them, keys outside the range may hold anything and are not read
        check_finite(keys, "keys")  # (a static cache's unwritten slots; a check there would also cost a host read)
    first, end = _sequence_bounds(starts, lengths, keys)
    scores = torch.matmul(q3.float(), k3.float().transpose(1, 2))  # [L, M, N]
    if per_kv_head:
        scores = scores.sum(dim=1, keepdim=True)
    positions = torch.arange(k3.shape[1], device=k3.device)
    leads_per_seq = k3.shape[0] // keys.shape[0]
    if first is not None:
        scores = scores.masked_fill(positions < first.repeat_interleave(leads_per_seq).view(-1, 1, 1), float("-inf"))
    if end is not None:
        scores = scores.masked_fill(positions >= end.repeat_interleave(leads_per_seq).view(-1, 1, 1), float("-inf"))
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
        if q.shape[0] != keys.shape[0] or hkv == 0 or hq % hkv:
            raise ValueError(f"q {tuple(q.shape)} and keys {tuple(keys.shape)}: need the same batch and Hq a "
                             f"multiple of Hkv (GQA)")
        q3 = q.reshape(b * hkv, hq // hkv, d)
        out_shape = (b, hkv) if per_kv_head else (b, hq)
    elif q.dim() == keys.dim() and q.shape[:-2] == keys.shape[:-2]:  # folded: q [*, M, d], keys [*, N, d]
        q3 = q.reshape(math.prod(q.shape[:-2]), q.shape[-2], d)
        out_shape = (*q.shape[:-2], 1 if per_kv_head else q.shape[-2])
    else:
        raise ValueError(f"q {tuple(q.shape)} does not fit keys {tuple(keys.shape)}: pass q [B, Hq, d] with keys "
                         "[B, Hkv, N, d], or q [*, M, d] with keys [*, N, d]")
    if per_kv_head and q3.shape[1] > MAX_GROUP_BLOCK:
        raise ValueError(f"per_kv_head sums at most {MAX_GROUP_BLOCK} query heads per KV head, got {q3.shape[1]}")
    return q3, keys.reshape(math.prod(keys.shape[:-2]), n, d), out_shape  # explicit sizes: N or M may be 0


def _sequence_bounds(starts: torch.Tensor | None, lengths: torch.Tensor | None,
                     keys: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Each sequence's first valid key and one past its last, ``[B]`` int32 on the keys' device (None: 0 / N).

    The kernels clamp them to [0, N] (an end before its start: no valid key), so int32 values pass through without
    a launch: a decode step's ranges cost nothing on the host. Wider integers are clamped before their cast."""
    b, n = keys.shape[0], keys.shape[-2]
    bounds = []
    for name, value in (("starts", starts), ("lengths", lengths)):
        if value is not None:
            if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] != b:
                raise ValueError(f"{name} must be a 1-D tensor of {b} per-sequence key positions")
            if value.dtype.is_floating_point or value.dtype == torch.bool or value.device != keys.device:
                raise ValueError(f"{name} must be an integer tensor on the keys' device ({keys.device})")
            if value.dtype != torch.int32:  # clamped as int64: N may not fit a narrower type
                value = value.long().clamp(0, n).to(torch.int32)
        bounds.append(value)
    return bounds[0], bounds[1]


MAX_SORT_BLOCK = 8192  # the most winners a row may have for _sort_rows_in_registers (compiled without spills)
SORT_ALWAYS, SORT_ONE_WAVE = 512, 2048  # where the in-register sort is used (see _sort_rows)


def _sort_rows(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row best first, ties to the lower index: the one-launch sort in registers where it was measured faster
    than :func:`_sort_best_first` (a dozen torch launches), i.e. k <= 512, or k <= 2048 while the rows fit one wave.
    H200, 2026-12-07, sorted us (sort kernel / torch sort): b1 8K k = 64 21.8 / 57.5, k = 2048 76.6 / 92.3; b16 8K
    k = 512 161.9 / 200.0; slower at b16 (512 rows) k = 2048, 341.2 / 299.9, and at b1 k = 8192, 427.4 / 308.6: a
    bitonic sort's cost grows as k log^2 k per program."""
    rows, k = scores.shape
    if rows and (k <= SORT_ALWAYS or (k <= SORT_ONE_WAVE and rows <= sm_count(scores.device))):
        return _sort_rows_in_registers(scores, indices)
    return _sort_best_first(scores, indices)


def _sort_rows_in_registers(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row in place, one program per row (k <= MAX_SORT_BLOCK)."""
    k = scores.shape[-1]
    if k > MAX_SORT_BLOCK:
        raise ValueError(f"rows of {k} winners exceed the in-register sort's {MAX_SORT_BLOCK}; use _sort_best_first")
    block = max(16, next_pow2(k))
    launch(_sort_rows_kernel, (scores.shape[0],), (scores, indices, k), dict(BLOCK=block),
           num_warps=8 if block >= 2048 else 4)
    return scores, indices


def ordered_keys(scores: torch.Tensor) -> torch.Tensor:
    """fp32 scores as int32 keys whose signed order is the float order, as the kernels compare them (which also
    fold -0.0 onto +0.0), e.g. against their thresholds."""
    bits = scores.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _sort_best_first(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order rows by score descending, ties by index ascending (-1 padding, scored -inf, last): one sort of a
    packed int64 key (the float's order-preserving bits, then the complemented index)."""
    key = ordered_keys(scores).long()
    order = ((key << 32) | (0xFFFFFFFF - indices.clamp(min=0))).argsort(dim=-1, descending=True)
    return scores.gather(-1, order), indices.gather(-1, order)


def _select(q3: torch.Tensor, k3: torch.Tensor, k: int, bounds: tuple, sequences: int, per_kv_head: bool):
    """The launches. Returns unordered ``scores [R, k]`` and ``indices [R, k]`` (R = output rows)."""
    if k3.stride(-1) != 1:
        k3 = k3.contiguous()
    q3 = q3.contiguous()
    n_lead, m, d = q3.shape
    n = k3.shape[1]
    rows = n_lead if per_kv_head else n_lead * m
    if rows == 0:  # an empty batch
        return q3.new_empty(0, k, dtype=torch.float32), q3.new_empty(0, k, dtype=torch.int64)
    leads_per_seq = n_lead // sequences
    device = k3.device
    block_n = 64 if k3.dtype == torch.float32 else 128
    block_m = max(16, next_pow2(min(m, MAX_GROUP_BLOCK)))
    m_blocks = cdiv(m, block_m)
    # row strides padded to 16 so that Triton's divisibility specialisation stays fixed as N grows while decoding
    # (N itself is not specialised): one compilation per configuration, vectorised row accesses
    row_stride = _round16(n)
    # programs per SM: 4 (two waves of the two that fit) balance long rows; short rows take one wave, each program a
    # few tiles, rather than two waves of one tile each
    per_sm = 2 if n <= SHORT_ROW else 4
    splits = max(1, min(cdiv(n, block_n), cdiv(per_sm * sm_count(device), n_lead * m_blocks)))
    per_split = cdiv(cdiv(n, splits), block_n) * block_n
    starts, ends = (q3 if bound is None else bound for bound in bounds)  # q3: an unused pointer
    dot_fp32 = k3.dtype == torch.float32 or q3.dtype == torch.float32 or interpreting() or q3.dtype != k3.dtype
    tile = dict(D=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_M=block_m, BLOCK_N=block_n, REDUCE_GROUP=per_kv_head,
                DOT_FP32=dot_fp32, HAS_STARTS=bounds[0] is not None, HAS_ENDS=bounds[1] is not None)
    line = 128 // k3.element_size()  # elements of a 128-byte line
    prefetch = 0 if interpreting() else next_pow2(cdiv(PREFETCH_TILES * block_n * d, line))  # lines, no asm on CPU

    sample = _sample_size(n)
    expected = _expected_candidates(n, k, sample)
    sublists = _sublists(expected, n, rows, device)
    # score program `split` appends to segment split % sublists of its row, long enough for all its programs' keys
    segment = cdiv(cdiv(n, per_split), sublists) * per_split if sublists > 1 else row_stride
    row_stride = max(row_stride, sublists * segment)
    samples = _scratch(device, "samples", (rows, sample), torch.float32)
    thresholds = _scratch(device, "thresholds", (rows,), torch.int32)
    candidates = _scratch(device, "candidates", (rows, row_stride), torch.int64)
    workspace = _scratch(device, "workspace", (rows, WORKSPACE_WIDTH), torch.int32, zeroed=True)
    lists = dict(SUBLISTS=sublists, COUNTER_STRIDE=LINE_INTS)
    split = _split_finalize(expected, rows, device)
    block_f = CUT_CAP if split else _finalize_block(expected)
    block_s = min(CUT_BLOCK, block_f // 4)
    histograms = _scratch(device, "histograms", (rows, WIDE_BINS), torch.int32, zeroed=True) if split else workspace
    cut_rows = _scratch(device, "cut_rows", (rows, CUT_CAP), torch.int64) if split else candidates
    # the score kernel's first tiles overlap the sample and threshold kernels. Per KV head (b1 128K k=2048, graph):
    # select + attend 147.0 -> 137.2 us on the H100, 134.4 -> 114.7 us on the H200 (2026-12-06); per query head
    # 12-17 us slower on the H100 when both selections did it, so it stays off there
    early = per_kv_head
    cut_bins = _scratch(device, "cut_bins", (rows, block_s), torch.int64)
    out_scores = torch.empty(rows, k, dtype=torch.float32, device=device)
    out_indices = torch.empty(rows, k, dtype=torch.int64, device=device)
    try:
        launch(_sample_kernel, (n_lead * m_blocks, sample // block_n),
               (q3, k3, starts, ends, leads_per_seq, samples, n, m, k3.stride(0), k3.stride(1)),
               dict(**tile, SAMPLE=sample),
               num_warps=4)
        launch(_threshold_kernel, (rows,), (samples, starts, ends, rows // sequences, thresholds, n, k),
               dict(HAS_STARTS=tile["HAS_STARTS"], HAS_ENDS=tile["HAS_ENDS"], SAMPLE=sample, SIGMAS=SAMPLE_SIGMAS,
                    SLACK=SAMPLE_SLACK, EARLY=early),
               num_warps=THRESHOLD_WARPS)
        launch(_score_kernel, (n_lead * m_blocks, cdiv(n, per_split)),
               (q3, k3, starts, ends, leads_per_seq, thresholds, candidates, workspace, n, m, k3.stride(0),
                k3.stride(1), per_split, row_stride, segment),
               dict(**tile, WIDTH=WORKSPACE_WIDTH, **lists, EARLY=early, PREFETCH_LINES=prefetch, LINE=line),
               num_warps=8 if block_n == 128 else 4)
        if split:
            parts = max(1, min(cdiv(int(expected), ROUTE_BLOCK), cdiv(4 * sm_count(device), rows)))
            row_args = (starts, ends, rows // sequences, thresholds, candidates, workspace, histograms, n, k,
                        row_stride, segment)
            bounds_flags = dict(HAS_STARTS=tile["HAS_STARTS"], HAS_ENDS=tile["HAS_ENDS"], WIDTH=WORKSPACE_WIDTH,
                                **lists, NB=WIDE_BINS)
            launch(_histogram_kernel, (rows, parts), row_args, dict(**bounds_flags, BLOCK=ROUTE_BLOCK), num_warps=4)
            launch(_route_kernel, (rows, parts), (*row_args, out_scores, out_indices, cut_rows),
                   dict(**bounds_flags, CAP=CUT_CAP, BLOCK=ROUTE_BLOCK), num_warps=4)
        launch(_finalize_kernel, (rows,),
               (q3, k3, starts, ends, leads_per_seq, thresholds, candidates, workspace, cut_bins, histograms,
                cut_rows, out_scores, out_indices, n, m, k, k3.stride(0), k3.stride(1), row_stride, segment),
               dict(**tile, NB=HIST_BINS, BLOCK_F=block_f, BLOCK_S=block_s, WIDTH=WORKSPACE_WIDTH, **lists,
                    SPLIT=split, WIDE_NB=WIDE_BINS, CAP=CUT_CAP), num_warps=_finalize_warps(n, rows, block_f, device))
    except BaseException:
        _SCRATCH.get(_scratch_key(device), {}).pop("workspace", None)  # a failed launch can leave it dirty
        raise
    return out_scores, out_indices


def _sample_size(n: int) -> int:
    """Keys sampled per row of N: SAMPLE (every key when N <= SAMPLE); for short rows an eighth of them, at least
    SHORT_SAMPLE: sampling half of an 8K row costs more than the extra candidates it saves. With the one wave of
    score programs for short rows (H100, 2026-12-07, bench_kernels b1 8K k = 64 / 512 / 2048): 24.5 / 27.0 / 35.9 ->
    22.8 / 23.7 / 35.2 us; b16 8K k = 64: 199.4 -> 141.6 us."""
    if n <= SAMPLE:
        return SAMPLE
    return max(SHORT_SAMPLE, min(SAMPLE, next_pow2(n) // 8))


def _sample_rank(k: int, length: int, sample: int = SAMPLE) -> int:
    """Rank r of the threshold among a row's sampled scores: with ``s`` of ``length`` keys sampled, the r-th
    largest sample leaves fewer than k keys above it only if r of the samples hit the row's top k - 1, a count of
    mean lam = k * s / length, so r = lam + SAMPLE_SIGMAS * sqrt(lam) + SAMPLE_SLACK makes that a > 5-sigma event
    (then the finalize rescans the row). About r * length / s keys pass. Every key sampled: r = k, exact. The
    threshold kernel computes the same rank per row on the device; this copy sizes the finalize."""
    s = min(length, sample)
    if s == length:
        return k
    lam = k * s / length
    return min(s, math.ceil(lam + SAMPLE_SIGMAS * math.sqrt(lam) + SAMPLE_SLACK))


def _expected_candidates(n: int, k: int, sample: int) -> float:
    """Keys of a row of N expected to reach its sampled threshold."""
    return _sample_rank(k, n, sample) * n / min(n, sample)


def _split_finalize(expected: float, rows: int, device: torch.device) -> bool:
    """Finalize in parts where one program per row would leave most SMs idle on long rows: more than SPLIT_FROM
    candidates expected per row while the rows fit one wave of programs, or more than SPLIT_ALWAYS_FROM. H100,
    2026-12-07, graph us, one program per row -> in parts: b1 512K k = 32768 628.6 -> 494.8 (per KV head 538.4 ->
    398.9), b1 128K k = 8192 156.4 -> 153.0 (140.9 -> 132.5), b16 512K k = 32768 7208 -> 6996; slower at b16 128K
    k = 8192 (512 rows of ~11K candidates), 1798 -> 1833, which keeps one program per row."""
    return expected > SPLIT_ALWAYS_FROM or (expected > SPLIT_FROM and rows <= sm_count(device))


def _sublists(expected: float, n: int, rows: int, device: torch.device) -> int:
    """Candidate segments per row (each with its own counter): SUBLISTS where at least 1/16 of a row's keys are
    expected to pass while the rows fit one wave of programs, else 1. A row's candidates then queue on several
    counters instead of one. H100, 2026-12-07, score kernel alone (PDL off), one counter -> four (interleaved
    probe): b1 8K k = 2048 15.7 -> 9.6 us, 128K k = 8192 111.8 -> 97.1, 512K k = 32768 422.1 -> 379.0; slower at
    b16 128K (512 rows: 1543 -> 1595 us at k = 2048), where the rows already spread the atomics. As committed
    (segments), bench_kernels b1, same call: 8K k = 2048 35.8 -> 29.6 us, 128K k = 8192 151.5 -> 138.6, 512K
    k = 32768 506.5 -> 443.8."""
    return SUBLISTS if expected * 16 >= n and rows <= sm_count(device) else 1


def _finalize_block(expected: float) -> int:
    """Candidates the finalize keeps in registers: the expected count rounded up to a power of two, 256 ..
    FINALIZE_BLOCK_CAP (the rest are read from L2 in chunks each pass). A block of 8192 spills with 8 or 16 warps
    (compiled for sm_90: 255 registers and 120 stack bytes, or 128 and 160; `benchmarks/kernel_resources.py`); 4096
    does not. H100, 2026-12-06, b1 128K k = 8192: finalize 79.5 -> 72.0 us, graph 170.5 -> 164.8 us; k <= 2048
    unchanged. Every step over the block is unrolled over a thread's share of it, so the block also sets the code's
    size, and Nsight Compute found the finalize waiting on instruction fetch for half its time (H100, 2026-12-07: 6,664
    instructions at 4096, 2,688 at 1024; see benchmarks/RESULTS.md). Smaller caps cut the code but read the rest from
    L2 three times, and lose: bench_kernels b1 per query head, 4096 -> 2048 -> 1024 (H100, 2026-12-07): 128K k = 2048
    121 -> 124-126 -> 133-135 us, 8K k = 2048 29.4-29.7 -> 29.3-29.5 -> 37.7 us."""
    return min(FINALIZE_BLOCK_CAP, max(256, next_pow2(int(expected))))


def _finalize_warps(n: int, rows: int, block: int, device: torch.device) -> int:
    """16 warps for the finalize of long rows (N > SHORT_ROW) with the largest register block (FINALIZE_BLOCK_CAP)
    whose programs fit one wave, else 8: half the code per thread (4,608 instructions instead of 6,664 at 128K
    k = 2048), where the finalize waits on instruction fetch. Graph us, 8 -> 16 warps (2026-12-07, H100 / H200): b1
    128K k = 2048 per KV head 122.2-124.0 -> 115.9-117.7 / 98.3-98.7 -> 95.1-95.5, per query head within 1 us;
    select + attend per KV head 133.8-136.8 -> 127.2-128.5 / 110.2-112.9 -> 104.3-104.9. Elsewhere 16 warps lost
    or tied: +1-2 us at 128K k = 64 (a block of 512) and 8K (presumably as the early-launched finalize's programs,
    16 warps of 128 registers, fill an SM's register file beside the one wave of score programs), +1 us in parts
    (128K k = 8192), +10-19 us at b16 per query head (512 rows), 512K tied; 32 warps spill and lost everywhere."""
    return 16 if block >= FINALIZE_BLOCK_CAP and n > SHORT_ROW and rows <= sm_count(device) else 8


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
    def _row_range(start_ptr, end_ptr, seq, N, HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr):
        """The valid keys [start, end) of sequence ``seq``, clamped to [0, N] (every key without bounds)."""
        start = 0
        end = N
        if HAS_STARTS:
            start = tl.minimum(tl.maximum(tl.load(start_ptr + seq), 0), N)
        if HAS_ENDS:
            end = tl.minimum(tl.maximum(tl.load(end_ptr + seq), start), N)
        return start, end

    @triton.jit(do_not_specialize=["k"])
    def _sort_rows_kernel(s_ptr, i_ptr, k, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Sort one row of k (score, index) pairs best first, ties to the lower index, in place: one int64 key per
        pair (the score's ordered key, then the index complemented, -1 padding included), sorted descending."""
        pdl_enter(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < k
        score = tl.load(s_ptr + row * k + offs, mask=ok, other=0.0)
        index = tl.load(i_ptr + row * k + offs, mask=ok, other=-1)
        packed = (_ordered_key(score).to(tl.int64) << 32) | (4294967294 - index)  # index -1 .. 2**32 - 2
        packed = tl.sort(tl.where(ok, packed, -9223372036854775807 - 1), descending=True)
        tl.store(s_ptr + row * k + offs, _key_to_float((packed >> 32).to(tl.int32)), mask=ok)
        tl.store(i_ptr + row * k + offs, 4294967294 - (packed & 4294967295), mask=ok)

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
    def _query_block(q_ptr, lead, mb, M, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     DOT_FP32: tl.constexpr):
        """The BLOCK_M query rows ``mb`` of KV row ``lead`` (zero past M), and which of them exist."""
        m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        dd = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + (lead * M + m[:, None]).to(tl.int64) * D + dd[None, :],
                    mask=(m[:, None] < M) & (dd[None, :] < D), other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        return q, m < M

    @triton.jit
    def _tile_scores(q, m_ok, key_base, n, in_tile, stride_kn, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     REDUCE_GROUP: tl.constexpr, DOT_FP32: tl.constexpr):
        """Scores of the keys at positions ``n`` (loaded where ``in_tile``): ``[BLOCK_M, BLOCK_N]`` per query row,
        or ``[1, BLOCK_N]`` summed over the group. Every kernel scores through here, so equal inputs give
        bit-equal scores."""
        dd = tl.arange(0, BLOCK_D)
        keys = tl.load(key_base + n[:, None].to(tl.int64) * stride_kn + dd[None, :],
                       mask=in_tile[:, None] & (dd[None, :] < D), other=0.0, eviction_policy="evict_first")
        if DOT_FP32:
            s = tl.dot(q, tl.trans(keys.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(keys))
        if REDUCE_GROUP:
            s = tl.sum(tl.where(m_ok[:, None], s, 0.0), axis=0, keep_dims=True)
        return s

    @triton.jit
    def _output_rows(lead, m, m_ok, M, REDUCE_GROUP: tl.constexpr):
        """Output row of each score row of a tile, and which exist (the summed row of a group is the lead's)."""
        if REDUCE_GROUP:
            rows, rows_ok = lead + tl.zeros((1,), tl.int32), tl.full((1,), 1, tl.int1)
        else:
            rows, rows_ok = lead * M + m, m_ok
        return rows, rows_ok

    @triton.jit(do_not_specialize=["N"])
    def _sample_kernel(q_ptr, k_ptr, start_ptr, end_ptr, leads_per_seq, smp_ptr, N, M, stride_kl, stride_kn,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       REDUCE_GROUP: tl.constexpr, DOT_FP32: tl.constexpr, HAS_STARTS: tl.constexpr,
                       HAS_ENDS: tl.constexpr, SAMPLE: tl.constexpr, PDL: tl.constexpr):
        """Scores of BLOCK_N of the SAMPLE keys sampled from one KV row: one key per stratum of length // SAMPLE
        keys, at a hashed offset inside it (every key, in order, when the row holds at most SAMPLE); -inf past
        the row's sample."""
        pdl_enter(PDL)
        pid, part = tl.program_id(0), tl.program_id(1)
        m_blocks = tl.cdiv(M, BLOCK_M)
        lead, mb = pid // m_blocks, pid % m_blocks
        q, m_ok = _query_block(q_ptr, lead, mb, M, D, BLOCK_D, BLOCK_M, DOT_FP32)
        rows, rows_ok = _output_rows(lead, mb * BLOCK_M + tl.arange(0, BLOCK_M), m_ok, M, REDUCE_GROUP)
        first, end = _row_range(start_ptr, end_ptr, lead // leads_per_seq, N, HAS_STARTS, HAS_ENDS)
        length = end - first
        stratum = tl.maximum(length // SAMPLE, 1)
        j = part * BLOCK_N + tl.arange(0, BLOCK_N)
        hashed = ((j.to(tl.uint32) * 2654435761) >> 7).to(tl.int64)
        n = first + tl.where(length > SAMPLE, j.to(tl.int64) * length // SAMPLE + hashed % stratum, j)
        sampled = j < tl.minimum(length, SAMPLE)
        s = _tile_scores(q, m_ok, k_ptr + lead.to(tl.int64) * stride_kl, n, sampled, stride_kn, D, BLOCK_D,
                         REDUCE_GROUP, DOT_FP32)
        s = tl.where(sampled[None, :], s, float("-inf"))
        tl.store(smp_ptr + rows[:, None].to(tl.int64) * SAMPLE + j[None, :], s, mask=rows_ok[:, None])

    @triton.jit(do_not_specialize=["N", "k"])
    def _threshold_kernel(smp_ptr, start_ptr, end_ptr, rows_per_seq, thr_ptr, N, k, HAS_STARTS: tl.constexpr,
                          HAS_ENDS: tl.constexpr, SAMPLE: tl.constexpr, SIGMAS: tl.constexpr, SLACK: tl.constexpr,
                          EARLY: tl.constexpr, PDL: tl.constexpr):
        """One row's candidate threshold: the r-th largest of its sampled scores (:func:`_sample_rank`), found by
        halving [min, max] on the values until at most ~1.06 r samples lie above the lower end. With EARLY it lets
        the score kernel launch before it waits for the samples (see :func:`_score_kernel`)."""
        if EARLY:
            pdl_release(PDL)
            pdl_wait(PDL)
        else:
            pdl_enter(PDL)
        row = tl.program_id(0)
        first, end = _row_range(start_ptr, end_ptr, row // rows_per_seq, N, HAS_STARTS, HAS_ENDS)
        length = end - first
        sampled = tl.minimum(length, SAMPLE)
        j = tl.arange(0, SAMPLE)
        s = tl.load(smp_ptr + row.to(tl.int64) * SAMPLE + j)
        k_eff = tl.minimum(k, length)
        lam = k_eff.to(tl.float32) * sampled.to(tl.float32) / tl.maximum(length, 1).to(tl.float32)
        rank = tl.minimum(tl.ceil(lam + SIGMAS * tl.sqrt(lam) + SLACK).to(tl.int32), sampled)
        rank = tl.where(sampled == length, k_eff, rank)
        lo = tl.min(tl.where(j < sampled, s, float("inf")), axis=0)  # rank <= sampled values are >= lo
        hi = tl.max(s, axis=0)
        above = sampled  # values >= lo
        steps = 0
        while (steps < 40) & (above > rank + rank // 16 + 2) & (hi > lo):
            mid = lo * 0.5 + hi * 0.5
            count = tl.sum((s >= mid).to(tl.int32), axis=0)
            move = (count >= rank) & (mid > lo)
            hi = tl.where(move, hi, tl.maximum(mid, lo))
            lo = tl.where(move, mid, lo)
            above = tl.where(move, count, above)
            steps += 1
        # a rank as large as the sample (k close to the row's keys) bounds nothing: every valid key is a candidate
        threshold = tl.where((rank >= sampled) & (sampled < length), -2147483648, _ordered_key(lo))
        tl.store(thr_ptr + row, tl.where(k_eff > 0, threshold, 2147483647))

    @triton.jit(do_not_specialize=["N"])
    def _score_kernel(q_ptr, k_ptr, start_ptr, end_ptr, leads_per_seq, thr_ptr, cand_ptr, ws_ptr, N, M, stride_kl,
                      stride_kn, per_split, row_stride, segment, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, REDUCE_GROUP: tl.constexpr,
                      DOT_FP32: tl.constexpr, HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, WIDTH: tl.constexpr,
                      SUBLISTS: tl.constexpr, COUNTER_STRIDE: tl.constexpr, EARLY: tl.constexpr,
                      PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr, PDL: tl.constexpr):
        """Stream a span of one KV row's keys once, score them against BLOCK_M query rows on the tensor cores, and
        append (key << 32 | index) of every valid key at or above its row's threshold to the row's candidates (an
        atomic per such key; with SUBLISTS > 1, to segment split % SUBLISTS of the row, on that segment's counter);
        then raise the row's largest candidate key. Nothing else is written.

        With EARLY (the threshold kernel then lets this one launch at once) the first two tiles are scored before
        waiting for the thresholds, overlapping the sample and threshold kernels: they read only the inputs, which
        every kernel before the sample kernel has finished writing once this one runs (see ``pdl_enter``). Before
        waiting, each program also asks L2 for the PREFETCH_LINES lines after those tiles (none under the
        interpreter): K's stream starts while the thresholds are computed, without holding registers."""
        pid, split = tl.program_id(0), tl.program_id(1)
        m_blocks = tl.cdiv(M, BLOCK_M)
        lead, mb = pid // m_blocks, pid % m_blocks
        q, m_ok = _query_block(q_ptr, lead, mb, M, D, BLOCK_D, BLOCK_M, DOT_FP32)
        rows, rows_ok = _output_rows(lead, mb * BLOCK_M + tl.arange(0, BLOCK_M), m_ok, M, REDUCE_GROUP)
        first, end = _row_range(start_ptr, end_ptr, lead // leads_per_seq, N, HAS_STARTS, HAS_ENDS)
        key_base = k_ptr + lead.to(tl.int64) * stride_kl
        span = split * per_split  # a multiple of BLOCK_N, as is the first tile holding a valid key
        lo, hi = tl.maximum(span, first // BLOCK_N * BLOCK_N), tl.minimum(span + per_split, end)
        if EARLY:
            n_a = lo + tl.arange(0, BLOCK_N)
            n_b = n_a + BLOCK_N
            valid_a = (n_a >= first) & (n_a < hi)
            valid_b = (n_b >= first) & (n_b < hi)
            s_a = _tile_scores(q, m_ok, key_base, n_a, valid_a, stride_kn, D, BLOCK_D, REDUCE_GROUP, DOT_FP32)
            s_b = _tile_scores(q, m_ok, key_base, n_b, valid_b, stride_kn, D, BLOCK_D, REDUCE_GROUP, DOT_FP32)
        if PREFETCH_LINES > 0:
            ahead = lo + 2 * BLOCK_N if EARLY else lo
            lines = ahead.to(tl.int64) * stride_kn + tl.arange(0, PREFETCH_LINES).to(tl.int64) * LINE
            last = (hi.to(tl.int64) - 1) * stride_kn + D - 1  # the span's last element
            prefetch_l2(key_base + tl.maximum(tl.minimum(lines, last), 0))
        pdl_enter(PDL)
        threshold = tl.load(thr_ptr + rows, mask=rows_ok, other=2147483647)
        ws_rows = ws_ptr + rows * WIDTH
        sub = split % SUBLISTS
        counters = ws_rows + sub * COUNTER_STRIDE
        base = rows.to(tl.int64) * row_stride + sub.to(tl.int64) * segment
        largest = tl.full(threshold.shape, -2147483648, tl.int32)
        if EARLY:
            largest = _append_candidates(s_a, n_a, valid_a, rows_ok, threshold, counters, cand_ptr, base, largest)
            largest = _append_candidates(s_b, n_b, valid_b, rows_ok, threshold, counters, cand_ptr, base, largest)
            lo += 2 * BLOCK_N
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = (n >= first) & (n < hi)
            s = _tile_scores(q, m_ok, key_base, n, valid, stride_kn, D, BLOCK_D, REDUCE_GROUP, DOT_FP32)
            largest = _append_candidates(s, n, valid, rows_ok, threshold, counters, cand_ptr, base, largest)
        # as an unsigned maximum, so that the zeroed workspace is its neutral value
        tl.atomic_max((ws_rows + 1).to(tl.pointer_type(tl.uint32), bitcast=True),
                      (largest ^ -2147483648).to(tl.uint32, bitcast=True), mask=rows_ok, sem="relaxed")

    @triton.jit
    def _append_candidates(s, n, valid, rows_ok, threshold, counters, cand_ptr, base, largest):
        """Append (key << 32 | index) of the tile's keys at or above their row's threshold to the row's candidates
        from ``base`` on: a slot per passing key from the row's counter (a few per row and tile), no scan, no layout
        change of the dot's result. Returns each row's largest candidate key so far."""
        key = _ordered_key(s)
        take = rows_ok[:, None] & valid[None, :] & (key >= threshold[:, None])
        slot = tl.atomic_add(counters[:, None] + tl.zeros_like(n)[None, :], 1, mask=take, sem="relaxed")
        tl.store(cand_ptr + base[:, None] + slot, (key.to(tl.int64) << 32) | n[None, :], mask=take)
        return tl.maximum(largest, tl.max(tl.where(take, key, -2147483648), axis=1))

    @triton.jit
    def _row_candidates(start_ptr, end_ptr, seq, thr_ptr, ws_row, row, N, k, segment, HAS_STARTS: tl.constexpr,
                        HAS_ENDS: tl.constexpr, SUBLISTS: tl.constexpr, COUNTER_STRIDE: tl.constexpr):
        """A row after the score pass: its valid keys [first, end), k_eff, its candidate count, threshold key,
        largest candidate key, and where its candidates lie (``layout``, see :func:`_slots`)."""
        first, end = _row_range(start_ptr, end_ptr, seq, N, HAS_STARTS, HAS_ENDS)
        k_eff = tl.minimum(k, end - first)
        c0 = tl.load(ws_row)
        c1 = tl.load(ws_row + COUNTER_STRIDE) if SUBLISTS > 1 else 0
        c2 = tl.load(ws_row + 2 * COUNTER_STRIDE) if SUBLISTS > 2 else 0
        c3 = tl.load(ws_row + 3 * COUNTER_STRIDE) if SUBLISTS > 3 else 0
        lo = tl.load(thr_ptr + row).to(tl.int64)
        hi = (tl.load(ws_row + 1) ^ -2147483648).to(tl.int64)
        return first, end, k_eff, c0 + c1 + c2 + c3, lo, hi, (c0, c0 + c1, c0 + c1 + c2, segment)

    @triton.jit
    def _slots(p, layout):
        """Where a row's p-th candidate lies. Its candidates fill up to four segments of ``segment`` slots from the
        start of each; ``layout`` = (e0, e1, e2, segment), e_s the candidates in segments 0..s. One list of count
        candidates: e0 = e1 = e2 = count (p < count stays put)."""
        e0, e1, e2, segment = layout
        return (p + tl.where(p >= e0, segment - e0, 0) + tl.where(p >= e1, segment - (e1 - e0), 0)
                + tl.where(p >= e2, segment - (e2 - e1), 0))

    @triton.jit
    def _one_list(count, segment):
        """The layout of a row whose ``count`` candidates lie in one list."""
        return count, count, count, segment

    @triton.jit
    def _bin_shift(lo, hi, NB: tl.constexpr):
        """A shift that maps the keys [lo, hi] into NB (a power of two) bins of 2**shift: the least, or one more
        where hi - lo rounds up to a power of two as a float (only past 2**24). From float exponents, not a loop of
        ~17 dependent steps a pass at 128K (~30 in a finalize). bench_kernels b1 per query head, loop -> exponents
        (H100, 2026-12-07, interleaved runs): 8K k = 64 / 512 / 2048 21.9-22.1 / 22.5-22.9 / 28.8-29.2 -> 21.2-21.7
        / 21.8-22.5 / 28.2-29.0 us, 128K k = 8192 136.5-137.3 -> 135.3-135.6 us (one run of three 139.3 as the
        copy bandwidth read 2.91 TB/s), 128K k <= 2048 tied."""
        per_bin = tl.maximum(hi - lo, 0).to(tl.float32) / NB  # exact: NB is a power of two
        exponent = ((per_bin.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 span / NB); -127 for 0
        return tl.maximum(exponent + 1, 0).to(tl.int64)

    @triton.jit
    def _wide_cut(hist_row, lo, hi, k_eff, NB: tl.constexpr, CAP: tl.constexpr):
        """Where a row's NB-bin histogram puts its k-th largest candidate: the cut's bin [bin_lo, bin_hi], the
        candidates still needed from it and those it holds; ``whole`` when it is needed whole, ``routed`` when the
        route kernel took the row (whole, or the bin fits the cut buffer)."""
        shift = _bin_shift(lo, hi, NB)
        hist = tl.load(hist_row + tl.arange(0, NB))
        b, need, in_bin = _pick_bin(hist, k_eff.to(tl.int64), NB)
        bin_lo = lo + (b << shift)
        bin_hi = tl.minimum(hi, bin_lo + (tl.full((), 1, tl.int64) << shift) - 1)
        whole = in_bin == need
        routed = (k_eff > 0) & (whole | (in_bin <= CAP))
        return routed, whole, bin_lo, bin_hi, need, in_bin

    @triton.jit
    def _row_share(start_ptr, end_ptr, rows_per_seq, thr_ptr, ws_ptr, N, k, segment, HAS_STARTS: tl.constexpr,
                   HAS_ENDS: tl.constexpr, WIDTH: tl.constexpr, SUBLISTS: tl.constexpr,
                   COUNTER_STRIDE: tl.constexpr):
        """A histogram or route program's row, its share (part of parts), the row's workspace and candidates."""
        row, part, parts = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        ws_row = ws_ptr + row * WIDTH
        _, _, k_eff, count, lo, hi, layout = _row_candidates(start_ptr, end_ptr, row // rows_per_seq, thr_ptr, ws_row,
                                                             row, N, k, segment, HAS_STARTS, HAS_ENDS, SUBLISTS,
                                                             COUNTER_STRIDE)
        return row, part, parts, ws_row, k_eff, count, lo, hi, layout

    @triton.jit(do_not_specialize=["N", "k"])
    def _histogram_kernel(start_ptr, end_ptr, rows_per_seq, thr_ptr, cand_ptr, ws_ptr, hist_ptr, N, k, row_stride,
                          segment, HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, WIDTH: tl.constexpr,
                          SUBLISTS: tl.constexpr, COUNTER_STRIDE: tl.constexpr, NB: tl.constexpr,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Count a share of one row's candidates in NB bins over [threshold, largest] into the row's histogram: an
        atomic per candidate (tl.histogram costs O(NB) a key: 74 us at b1 128K k = 8192 on the H100, 2026-12-07).
        Rows that need a rescan are left to the finalize."""
        pdl_enter(PDL)
        row, part, parts, ws_row, k_eff, count, lo, hi, layout = _row_share(
            start_ptr, end_ptr, rows_per_seq, thr_ptr, ws_ptr, N, k, segment, HAS_STARTS, HAS_ENDS, WIDTH, SUBLISTS,
            COUNTER_STRIDE)
        if (count >= k_eff) & (k_eff > 0):
            shift = _bin_shift(lo, hi, NB)
            cand_row = cand_ptr + row.to(tl.int64) * row_stride
            offs = tl.arange(0, BLOCK)
            for i0 in range(part * BLOCK, count, parts * BLOCK):
                ok = i0 + offs < count
                packed = tl.load(cand_row + _slots(i0 + offs, layout), mask=ok, other=0)
                tl.atomic_add(hist_ptr + row * NB + (((packed >> 32) - lo) >> shift), 1, mask=ok, sem="relaxed")

    @triton.jit(do_not_specialize=["N", "k"])
    def _route_kernel(start_ptr, end_ptr, rows_per_seq, thr_ptr, cand_ptr, ws_ptr, hist_ptr, N, k, row_stride,
                      segment, out_s_ptr, out_i_ptr, cut_ptr, HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr,
                      WIDTH: tl.constexpr, SUBLISTS: tl.constexpr, COUNTER_STRIDE: tl.constexpr, NB: tl.constexpr,
                      CAP: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Split a share of one row's candidates by its histogram's cut: those above the cut's bin (or in it, when
        it is needed whole) are winners, written at once; the cut's bin is copied to the row's cut buffer (slots
        from two counters of the workspace). Rows the cut buffer cannot hold are left whole to the finalize."""
        pdl_enter(PDL)
        row, part, parts, ws_row, k_eff, count, lo, hi, layout = _row_share(
            start_ptr, end_ptr, rows_per_seq, thr_ptr, ws_ptr, N, k, segment, HAS_STARTS, HAS_ENDS, WIDTH, SUBLISTS,
            COUNTER_STRIDE)
        if (count >= k_eff) & (k_eff > 0):
            routed, whole, bin_lo, bin_hi, need, in_bin = _wide_cut(hist_ptr + row * NB, lo, hi, k_eff, NB, CAP)
            if routed:
                cand_row = cand_ptr + row.to(tl.int64) * row_stride
                out_row = row.to(tl.int64) * k
                offs = tl.arange(0, BLOCK)
                for i0 in range(part * BLOCK, count, parts * BLOCK):
                    ok = i0 + offs < count
                    packed = tl.load(cand_row + _slots(i0 + offs, layout), mask=ok, other=0)
                    key = packed >> 32
                    win = ok & tl.where(whole, key >= bin_lo, key > bin_hi)  # a select: see _in_range
                    cut = ok & (key >= bin_lo) & ~win
                    # both compactions in one prefix sum (the cut's in the high half) and one 64-bit atomic on the
                    # two adjacent counters (winners written, cut copied)
                    flags = tl.where(win, 1, 0) + tl.where(cut, 65536, 0)
                    ends = tl.cumsum(flags, axis=0)
                    total = tl.sum(flags, axis=0).to(tl.int64)
                    before = tl.atomic_add((ws_row + 2).to(tl.pointer_type(tl.int64)),
                                           (total & 0xFFFF) | ((total >> 16) << 32), sem="relaxed")
                    slot = (before & 0xFFFFFFFF) + (ends & 0xFFFF) - 1
                    tl.store(out_s_ptr + out_row + slot, _key_to_float(key.to(tl.int32)), mask=win)
                    tl.store(out_i_ptr + out_row + slot, packed & 0xFFFFFFFF, mask=win)
                    slot = (before >> 32) + (ends >> 16) - 1
                    tl.store(cut_ptr + row.to(tl.int64) * CAP + slot, packed, mask=cut)

    @triton.jit(do_not_specialize=["N", "k"])
    def _finalize_kernel(q_ptr, k_ptr, start_ptr, end_ptr, leads_per_seq, thr_ptr, cand_ptr, ws_ptr, cut_ptr,
                         hist_ptr, cut_rows_ptr, out_s_ptr, out_i_ptr, N, M, k, stride_kl, stride_kn, row_stride,
                         segment, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, REDUCE_GROUP: tl.constexpr, DOT_FP32: tl.constexpr,
                         HAS_STARTS: tl.constexpr, HAS_ENDS: tl.constexpr, NB: tl.constexpr, BLOCK_F: tl.constexpr,
                         BLOCK_S: tl.constexpr, WIDTH: tl.constexpr, SUBLISTS: tl.constexpr,
                         COUNTER_STRIDE: tl.constexpr, SPLIT: tl.constexpr, WIDE_NB: tl.constexpr,
                         CAP: tl.constexpr, PDL: tl.constexpr):
        """One program per output row: its exact Top-k from its candidates (with SPLIT, of a routed row, from its
        cut's bin alone, after the winners the route kernel wrote), then its workspace (and histogram) zeroed
        again for the next call. If fewer than k keys passed the sampled threshold (a > 5-sigma miss, or
        adversarial input), the program rescans the row itself and takes every valid key as a candidate: slow,
        exact, rare."""
        pdl_enter(PDL)
        row = tl.program_id(0)
        rows_per_kv = 1 if REDUCE_GROUP else M
        lead = row // rows_per_kv
        ws_row = ws_ptr + row * WIDTH
        first, end, k_eff, count, lo, hi, layout = _row_candidates(start_ptr, end_ptr, lead // leads_per_seq, thr_ptr,
                                                                   ws_row, row, N, k, segment, HAS_STARTS, HAS_ENDS,
                                                                   SUBLISTS, COUNTER_STRIDE)
        ends0, ends1, ends2, _ = layout  # reassigned below where the candidates become one list
        cand_row = cand_ptr + row.to(tl.int64) * row_stride
        out_s_row = out_s_ptr + row.to(tl.int64) * k
        out_i_row = out_i_ptr + row.to(tl.int64) * k
        k_row = k
        if SPLIT:
            if (count >= k_eff) & (k_eff > 0):
                routed, whole, bin_lo, bin_hi, need, in_bin = _wide_cut(hist_ptr + row * WIDE_NB, lo, hi, k_eff,
                                                                        WIDE_NB, CAP)
                if routed:
                    written = k_eff - tl.where(whole, 0, need)
                    cand_row = cut_rows_ptr + row.to(tl.int64) * CAP
                    count = tl.where(whole, 0, in_bin).to(tl.int32)
                    ends0, ends1, ends2 = count, count, count
                    lo, hi = bin_lo, bin_hi
                    k_eff = (k_eff - written).to(tl.int32)
                    k_row = k - written.to(tl.int32)
                    out_s_row += written
                    out_i_row += written
            tl.store(hist_ptr + row * WIDE_NB + tl.arange(0, WIDE_NB), tl.zeros((WIDE_NB,), tl.int32))
        if count < k_eff:
            m = row % rows_per_kv
            q, m_ok = _query_block(q_ptr, lead, m // BLOCK_M, M, D, BLOCK_D, BLOCK_M, DOT_FP32)
            mine = (m // BLOCK_M) * BLOCK_M + tl.arange(0, BLOCK_M) == m
            key_base = k_ptr + lead.to(tl.int64) * stride_kl
            for n0 in range(first, end, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                s = _tile_scores(q, m_ok, key_base, n, n < end, stride_kn, D, BLOCK_D, REDUCE_GROUP, DOT_FP32)
                if not REDUCE_GROUP:
                    s = tl.sum(tl.where(mine[:, None], s, 0.0), axis=0, keep_dims=True)
                key = tl.reshape(_ordered_key(s), (BLOCK_N,))
                tl.store(cand_row + n - first, (key.to(tl.int64) << 32) | n, mask=n < end)
            tl.debug_barrier()  # the rescanned candidates are read back below
            count = end - first
            ends0, ends1, ends2 = count, count, count
            lo = tl.full((), -2147483648, tl.int64)
            hi = tl.full((), 2147483647, tl.int64)
        _finalize_row(cand_row, (ends0, ends1, ends2, segment), count, lo, hi, k_eff, k_row, N, out_s_row, out_i_row,
                      cut_ptr + row.to(tl.int64) * BLOCK_S, NB, BLOCK_F, BLOCK_F // 4, BLOCK_S)
        tl.store(ws_row + tl.arange(0, 4), tl.zeros((4,), tl.int32))
        segments = tl.arange(0, 4)  # the segments' counters (at most 4: see _slots)
        tl.store(ws_row + COUNTER_STRIDE * segments, tl.zeros((4,), tl.int32), mask=segments < SUBLISTS)

    @triton.jit
    def _sort_key(packed, phase):
        """What the finalize ranks by: the score key in phase 0; in phase 1 (the cut fell on a tie) minus the index,
        so that lower indices rank first."""
        return tl.where(phase == 0, packed >> 32, -(packed & 0xFFFFFFFF))

    @triton.jit
    def _in_range(packed, ok, phase, tie_key, lo, hi):
        """Which candidates lie in the narrowed range [lo, hi] (in phase 1: of those scoring tie_key)."""
        sort_key = _sort_key(packed, phase)
        # a select, not (phase == 0) | ...: Triton's interpreter gives that mix of scalar and block an int32 array
        return tl.where(phase == 0, ok, ok & ((packed >> 32) == tie_key)) & (sort_key >= lo) & (sort_key <= hi)

    @triton.jit
    def _candidate_histogram(packed, ok, phase, tie_key, lo, hi, shift, NB: tl.constexpr):
        """Histogram of one chunk of candidates over [lo, hi] in NB bins of 2**shift."""
        inside = _in_range(packed, ok, phase, tie_key, lo, hi)
        return tl.histogram(tl.where(inside, (_sort_key(packed, phase) - lo) >> shift, 0).to(tl.int32), NB,
                            mask=inside)

    @triton.jit
    def _append_slots(take, written):
        """Slots of the taken elements, in order, after ``written`` earlier ones; and the new count."""
        ones = tl.where(take, 1, 0)  # not take.to(): Triton's interpreter casts a mask in place
        return written + tl.cumsum(ones, axis=0) - 1, written + tl.sum(ones, axis=0)

    @triton.jit
    def _write_above_copy_bin(packed, ok, phase, tie_key, lo, hi, written, copied, out_s_ptr, out_i_ptr, cut_ptr):
        """After the first pass: the candidates above the cut's bin [lo, hi] are winners whatever the later passes
        find, so they are written now (after ``written`` earlier ones), and those in the bin are appended to
        ``cut_ptr`` (after ``copied``): one sweep and one prefix sum for both (the bin's count in the high half).
        Returns the new counts."""
        key = packed >> 32
        above = ok & (key > tl.where(phase == 0, hi, tie_key))
        inside = _in_range(packed, ok, phase, tie_key, lo, hi)
        flags = tl.where(above, 1, 0) + tl.where(inside, 65536, 0)
        ends = tl.cumsum(flags, axis=0)
        slot = written + (ends & 0xFFFF) - 1
        tl.store(out_s_ptr + slot, _key_to_float(key.to(tl.int32)), mask=above)
        tl.store(out_i_ptr + slot, packed & 0xFFFFFFFF, mask=above)
        tl.store(cut_ptr + copied + (ends >> 16) - 1, packed, mask=inside)
        total = tl.sum(flags, axis=0)
        return written + (total & 0xFFFF), copied + (total >> 16)

    @triton.jit
    def _write_winners(packed, ok, cut_key, cut_index, written, out_s_ptr, out_i_ptr):
        key = packed >> 32
        index = packed & 0xFFFFFFFF
        win = ok & ((key > cut_key) | ((key == cut_key) & (index <= cut_index)))
        slot, written = _append_slots(win, written)
        tl.store(out_s_ptr + slot, _key_to_float(key.to(tl.int32)), mask=win)
        tl.store(out_i_ptr + slot, index, mask=win)
        return written

    @triton.jit
    def _narrow(cand_ptr, layout, resident, count, lo, hi, need, phase, tie_key, cut_key, cut_index, done, in_bin, N,
                max_passes, NB: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
        """Up to ``max_passes`` radix passes over ``count`` candidates (the first BLOCK ``resident`` in registers,
        the rest read from ``cand_ptr`` as ``layout`` places them, in chunks of BLOCK_C): each histograms the range
        [lo, hi] and keeps the bin holding the need-th largest, until that bin is needed whole (``done``; winners:
        key > cut_key, or key == cut_key and index <= cut_index). ``in_bin``: the candidates left in [lo, hi]."""
        offs = tl.arange(0, BLOCK)
        chunk = tl.arange(0, BLOCK_C)
        passes = 0
        while (~done) & (passes < max_passes):
            shift = _bin_shift(lo, hi, NB)
            hist = _candidate_histogram(resident, offs < count, phase, tie_key, lo, hi, shift, NB)
            for i0 in range(BLOCK, count, BLOCK_C):
                packed = tl.load(cand_ptr + _slots(i0 + chunk, layout), mask=i0 + chunk < count, other=0)
                hist += _candidate_histogram(packed, i0 + chunk < count, phase, tie_key, lo, hi, shift, NB)
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
            passes += 1
        return lo, hi, need, phase, tie_key, cut_key, cut_index, done, in_bin

    @triton.jit
    def _finalize_row(cand_ptr, layout, count, lo, hi, k_eff, k, N, out_s_ptr, out_i_ptr, cut_ptr, NB: tl.constexpr,
                      BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """Exact Top-k of a row's ``count`` candidates (placed by ``layout``, see :func:`_slots`), whose keys lie in
        [lo, hi], then the winners written (and -inf / -1 past k_eff). The first BLOCK_F candidates (usually all)
        stay in registers, the rest are read in chunks of BLOCK_C. One radix pass over all of them; then, if at
        most BLOCK_S candidates are left in the cut's bin (the usual case), one more sweep writes those above the
        bin and copies the bin to ``cut_ptr``, and the passes go on over the copy alone, whose winners are written
        last (a pass over every candidate costs ~2 us at 4096 of them on the H100: the slowest row's passes set the
        kernel's time)."""
        offs = tl.arange(0, BLOCK_F)
        chunk = tl.arange(0, BLOCK_C)
        resident = tl.load(cand_ptr + _slots(offs, layout), mask=offs < count, other=0)
        need = k_eff.to(tl.int64)
        phase = tl.full((), 0, tl.int32)
        tie_key = tl.full((), 0, tl.int64)
        cut_key = lo - 1
        cut_index = tl.full((), -1, tl.int64)
        state = _narrow(cand_ptr, layout, resident, count, lo, hi, need, phase, tie_key, cut_key, cut_index,
                        need <= 0, count, N, 1, NB, BLOCK_F, BLOCK_C)
        lo, hi, need, phase, tie_key, cut_key, cut_index, done, in_bin = state
        if (~done) & (in_bin <= BLOCK_S):
            # winners above the bin written and the bin copied out in one sweep; the passes go on over the copy,
            # whose winners are written last
            zero = tl.full((), 0, tl.int32)
            written, copied = _write_above_copy_bin(resident, offs < count, phase, tie_key, lo, hi, zero, zero,
                                                    out_s_ptr, out_i_ptr, cut_ptr)
            for i0 in range(BLOCK_F, count, BLOCK_C):
                packed = tl.load(cand_ptr + _slots(i0 + chunk, layout), mask=i0 + chunk < count, other=0)
                written, copied = _write_above_copy_bin(packed, i0 + chunk < count, phase, tie_key, lo, hi, written,
                                                        copied, out_s_ptr, out_i_ptr, cut_ptr)
            tl.debug_barrier()  # the copies are read back by other threads
            in_small = tl.arange(0, BLOCK_S) < in_bin
            # addressed through _slots, as the candidates are, so that Triton keeps one layout for the bin's loads,
            # passes and stores (a plain arange added 5 layout conversions on 8 warps)
            small = tl.load(cut_ptr + _slots(tl.arange(0, BLOCK_S), _one_list(in_bin, 0)), mask=in_small, other=0)
            state = _narrow(cut_ptr, _one_list(in_bin, 0), small, in_bin, lo, hi, need, phase, tie_key, cut_key,
                            cut_index, done, in_bin, N, 80, NB, BLOCK_S, BLOCK_S)
            written = _write_winners(small, in_small, state[5], state[6], written, out_s_ptr, out_i_ptr)
        else:
            state = _narrow(cand_ptr, layout, resident, count, lo, hi, need, phase, tie_key, cut_key, cut_index,
                            done, in_bin, N, 80, NB, BLOCK_F, BLOCK_C)
            cut_key, cut_index = state[5], state[6]
            to_write = tl.where(k_eff > 0, count, 0)
            written = _write_winners(resident, offs < to_write, cut_key, cut_index, tl.full((), 0, tl.int32),
                                     out_s_ptr, out_i_ptr)
            for i0 in range(BLOCK_F, to_write, BLOCK_C):
                packed = tl.load(cand_ptr + _slots(i0 + chunk, layout), mask=i0 + chunk < count, other=0)
                written = _write_winners(packed, i0 + chunk < count, cut_key, cut_index, written, out_s_ptr,
                                         out_i_ptr)
        for j0 in range(k_eff, k, BLOCK_F):
            pad = j0 + offs < k
            tl.store(out_s_ptr + j0 + offs, float("-inf"), mask=pad)
            tl.store(out_i_ptr + j0 + offs, -1, mask=pad)
