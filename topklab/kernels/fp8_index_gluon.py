"""FP8 index scoring as a Gluon kernel (Hopper): the tensor cores score a query while CUDA cores reduce the last.

Why: the Triton kernel (:mod:`topklab.kernels.fp8_index`) waits for every FP8 product before its epilogue (ReLU,
weighted head sum, store) and the epilogue before the next product, so tensor cores and CUDA cores take turns; at
batch 16, 4 queries, 128K keys it sits at 1.56x its floor (H100). Here each product is one query's heads against a
key tile (``BLOCK_N`` keys x ``BLOCK_H`` heads, so the head sum is a plain row sum), issued asynchronously; the
program waits with one product still in flight (``wgmma.wait_group 1``) and runs the epilogue of the one before it.
Key tiles and their scales arrive by TMA into a ring of ``STAGES`` shared-memory slots; the queries' FP8 heads sit
in shared memory and their head weights (w * s_q) in registers for the whole run (weights read from shared memory
in each epilogue instead allowed 3 programs an SM against 2 at M = 4 but ran 168-172 us against 149-153 on the H100).

The overlap stays within a key tile: the last product of a tile is waited on with none in flight. Carrying it in
flight into the next tile (``wait_group 1`` across the loop's back edge) compiled, but ptxas 12.x then serialises
every wgmma of the kernel (C7514: "non wgmma instructions reading accumulator registers of a wgmma between start
and end of the pipeline stage", with or without peeling the first product), so at M = 1 there is no overlap within
a program (several programs an SM overlap instead), and at M = 4 three of four epilogues overlap a product.

Taken by :func:`topklab.kernels.fp8_index.fp8_index_scores` where it fits (CUDA, sm_90, d = 128, H <= 128) unless
``TOPKLAB_FP8_GLUON=0``. Gluon has no interpreter, so CPU tensors keep the torch reference / the Triton kernel;
the GPU tests compare it with the reference.
"""

from __future__ import annotations

import torch

from topklab.kernels._triton import cdiv, next_pow2, sm_count
from topklab.kernels.fp8_index import _check_index_inputs

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAS_GLUON = True
except ImportError:  # pragma: no cover - Triton without Gluon (before 3.5)
    HAS_GLUON = False

GLUON_DIM = 128  # the index head dim the kernel is built for (one 128-byte swizzled row per key)
MAX_GLUON_HEADS = 128  # one product's columns: a query's heads
BLOCK_N, STAGES = 64, 4  # keys a product; key tiles in the TMA ring (8.25 KiB a slot with their scales)
# programs an SM holds, by (BLOCK_H, queries a program): the register or shared-memory limit in the offline sm_90
# compile (benchmarks/compile_fp8_gluon.py checks it). 128 heads take 2 queries a program: 3 spill.
PROGRAMS_PER_SM = {(16, 1): 6, (16, 2): 6, (16, 3): 5, (16, 4): 5, (32, 1): 6, (32, 2): 5, (32, 3): 5, (32, 4): 4,
                   (64, 1): 5, (64, 2): 4, (64, 3): 3, (64, 4): 2, (128, 1): 4, (128, 2): 2}


def gluon_supports(q_fp8: torch.Tensor, k_fp8: torch.Tensor) -> bool:
    """Can the Gluon kernel score these inputs: Gluon present, a Hopper CUDA device, d = 128, H <= 128?"""
    if not HAS_GLUON or q_fp8.device.type != "cuda":
        return False
    _, _, heads, d = q_fp8.shape
    # warpgroup_mma is Hopper's: Blackwell's tensor cores take tcgen05 instead
    return d == GLUON_DIM and heads <= MAX_GLUON_HEADS and torch.cuda.get_device_capability(q_fp8.device)[0] == 9


def max_queries(block_h: int) -> int:
    """Queries a program scores against each key tile it loads: their products' accumulators and head weights
    live in registers, so 4 up to 64 heads, 2 at 128."""
    return 4 if block_h <= 64 else 2


def fp8_index_scores_gluon(q_fp8, q_scale, k_fp8, k_scale, weights) -> torch.Tensor:
    """:func:`topklab.kernels.fp8_index.fp8_index_scores` by the Gluon kernel (CUDA, see :func:`gluon_supports`).

    Same arguments and result; scales must be >= 0 (a negative one turns its query's or key's scores into NaN).
    """
    q_scale, k_scale = _check_index_inputs(q_fp8, q_scale, k_fp8, k_scale, weights)
    if not gluon_supports(q_fp8, k_fp8):
        raise ValueError("fp8_index_scores_gluon needs Triton with Gluon, a Hopper (sm_90) CUDA device, d = 128 "
                         f"and at most {MAX_GLUON_HEADS} heads; got q_fp8 {tuple(q_fp8.shape)} on {q_fp8.device}")
    return launch_gluon(q_fp8, q_scale, k_fp8, k_scale, weights)


def launch_gluon(q_fp8, q_scale, k_fp8, k_scale, weights) -> torch.Tensor:
    """The kernel on inputs already checked (by ``_check_index_inputs``, fp32 scales) and supported (see
    :func:`gluon_supports`): ``fp8_index_scores`` dispatches here without checking twice."""
    B, M, H, d = q_fp8.shape
    N = k_fp8.shape[1]
    q_fp8, q_scale, weights = q_fp8.contiguous(), q_scale.contiguous(), weights.float().contiguous()
    # TMA reads the keys as [B * N] rows of 128 bytes and the scales as one run of B rows, each of which must start
    # 16-byte aligned (an unaligned box start stops the kernel with an illegal instruction): rows padded to a
    # multiple of 4 scales where N is not
    keys = _aligned(k_fp8.reshape(B * N, d))
    scale_stride = cdiv(N, 4) * 4
    if scale_stride != N:
        k_scale = torch.nn.functional.pad(k_scale, (0, scale_stride - N))
    key_scales = _aligned(k_scale.reshape(B * scale_stride))
    out = torch.empty(B, M, N, dtype=torch.float32, device=q_fp8.device)
    block_h = max(16, next_pow2(H))
    groups = cdiv(M, max_queries(block_h))
    queries = cdiv(M, groups)
    keys_desc = TensorDescriptor.from_tensor(keys, [BLOCK_N, d], _keys_layout(BLOCK_N, d))
    scales_desc = TensorDescriptor.from_tensor(key_scales, [BLOCK_N], _scales_layout())
    tiles = cdiv(N, BLOCK_N)
    per_sm = PROGRAMS_PER_SM[block_h, queries]
    programs = max(1, min(tiles, per_sm * sm_count(q_fp8.device) // (B * groups)))
    tiles_per_program = cdiv(tiles, programs)
    _fp8_index_gluon_kernel[(cdiv(tiles, tiles_per_program), groups, B)](
        q_fp8, q_scale, weights, keys_desc, scales_desc, out, M, N, scale_stride, H, tiles_per_program,
        D=d, BLOCK_H=block_h, BLOCK_N=BLOCK_N, QUERIES=queries, STAGES=STAGES, num_warps=4)
    return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous from a 16-byte aligned address (a copy only when a view starts elsewhere)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _keys_layout(block_n: int, d: int):
    """128-byte swizzled rows, as TMA writes them and the FP8 wgmma reads them (K-major)."""
    return gl.NVMMASharedLayout.get_default_for([block_n, d], gl.float8e4nv)


def _scales_layout():
    """A plain 1-D run of fp32 key scales (TMA needs an NVMMA layout; no swizzle for one row)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)


if HAS_GLUON:

    @gluon.jit(do_not_specialize=["M", "N", "scale_stride", "tiles_per_program"])
    def _fp8_index_gluon_kernel(q_ptr, qs_ptr, w_ptr, keys_desc, scales_desc, out_ptr, M, N, scale_stride, H,
                                tiles_per_program,
                                D: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
                                QUERIES: gl.constexpr, STAGES: gl.constexpr):
        """A run of key tiles of one sequence against the heads of QUERIES queries, one async product per query.

        Product p (tile t, query j) is issued, then the program waits until only p is in flight and reduces p - 1:
        w * ReLU(q.k * s_q * s_k) = s_k * (w * s_q) * ReLU(q.k) since the scales are >= 0, so the epilogue is a max,
        a multiply-add per product element and the key scale once per row. The last product of a tile is waited on
        with none in flight (see the module docstring), which frees the tile's ring slot for the tile STAGES - 1 on.
        """
        pid_n, pid_m, b = gl.program_id(0), gl.program_id(1), gl.program_id(2)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_H, 32])
        row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)
        head_layout: gl.constexpr = gl.SliceLayout(0, acc_layout)
        first_query = pid_m * QUERIES

        # the queries' heads [QUERIES, BLOCK_H, D] into shared memory, zero for padded heads / queries
        q_smem = gl.allocate_shared_memory(gl.float8e4nv, [QUERIES, BLOCK_H, D],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_H, D], gl.float8e4nv))
        q_layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        q_heads = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, q_layout))
        q_dims = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
        for j in gl.static_range(QUERIES):
            m = first_query + j
            head_row = ((b * M + m) * H + q_heads).to(gl.int64)
            q = gl.load(q_ptr + head_row[:, None] * D + q_dims[None, :],
                        mask=((q_heads < H) & (m < M))[:, None], other=0.0)
            q_smem.index(j).store(q)

        # w * s_q per query and head, in registers for the whole run (a compile-time pick in each epilogue)
        weight0 = _head_weight(qs_ptr, w_ptr, b, first_query, M, H, BLOCK_H, head_layout)
        weight1 = weight0
        weight2 = weight0
        weight3 = weight0
        if QUERIES > 1:
            weight1 = _head_weight(qs_ptr, w_ptr, b, first_query + 1, M, H, BLOCK_H, head_layout)
        if QUERIES > 2:
            weight2 = _head_weight(qs_ptr, w_ptr, b, first_query + 2, M, H, BLOCK_H, head_layout)
        if QUERIES > 3:
            weight3 = _head_weight(qs_ptr, w_ptr, b, first_query + 3, M, H, BLOCK_H, head_layout)

        keys = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, D], keys_desc.layout)
        scales = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], scales_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
        fence_async_shared()  # the query heads and barriers, written by threads, before the async proxy reads them
        gl.thread_barrier()  # ... by every thread

        first = pid_n * tiles_per_program
        count = gl.minimum(first + tiles_per_program, gl.cdiv(N, BLOCK_N)) - first
        key_row = b * N + first * BLOCK_N
        scale_row = b * scale_stride + first * BLOCK_N
        for s in gl.static_range(STAGES - 1):
            _load_tile(keys_desc, scales_desc, keys, scales, ready, s, key_row, scale_row, s < count, BLOCK_N)

        rows = gl.arange(0, BLOCK_N, layout=row_layout)
        out_rows = out_ptr + (b * M + first_query).to(gl.int64) * N
        zero = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, acc_layout)
        for i in range(count):
            slot = i % STAGES
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            n = (first + i) * BLOCK_N + rows
            k_scale = scales.index(slot).load(row_layout)
            k_scale = gl.where(k_scale >= 0, k_scale, float("nan"))
            previous = warpgroup_mma(keys.index(slot), q_smem.index(0).permute((1, 0)), zero, use_acc=False,
                                     is_async=True)
            for j in gl.static_range(1, QUERIES):
                current = warpgroup_mma(keys.index(slot), q_smem.index(j).permute((1, 0)), zero, use_acc=False,
                                        is_async=True)
                done = warpgroup_mma_wait(num_outstanding=1, deps=[previous])
                weight = _pick(j - 1, weight0, weight1, weight2, weight3)
                _score(done, weight, k_scale, out_rows + (j - 1) * N, n, N, first_query + j - 1 < M)
                previous = current
            # the tile's last product: every product of the tile retires here, so its slot takes tile i + STAGES - 1
            done = warpgroup_mma_wait(num_outstanding=0, deps=[previous])
            _load_tile(keys_desc, scales_desc, keys, scales, ready, i + STAGES - 1, key_row, scale_row,
                       i + STAGES - 1 < count, BLOCK_N)
            weight = _pick(QUERIES - 1, weight0, weight1, weight2, weight3)
            _score(done, weight, k_scale, out_rows + (QUERIES - 1) * N, n, N, first_query + QUERIES - 1 < M)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))

    @gluon.jit
    def _head_weight(qs_ptr, w_ptr, b, m, M, H, BLOCK_H: gl.constexpr, layout: gl.constexpr):
        """w * s_q of query m's heads (0 for padded heads or queries; NaN where s_q < 0), one per product column."""
        h = gl.arange(0, BLOCK_H, layout=layout)
        ok = (h < H) & (m < M)
        head_row = (b * M + m) * H + h
        q_scale = gl.load(qs_ptr + head_row, mask=ok, other=0.0)
        weight = q_scale * gl.load(w_ptr + head_row, mask=ok, other=0.0)
        return gl.where(q_scale >= 0, weight, float("nan"))

    @gluon.jit
    def _pick(j: gl.constexpr, weight0, weight1, weight2, weight3):
        """The head weights of the program's query j (a compile-time pick among registers)."""
        if j == 0:
            return weight0
        elif j == 1:
            return weight1
        elif j == 2:
            return weight2
        else:
            return weight3

    @gluon.jit
    def _load_tile(keys_desc, scales_desc, keys, scales, ready, i, key_row, scale_row, pred, BLOCK_N: gl.constexpr):
        """TMA of the run's key tile i and its scales into ring slot i % STAGES (rows past the end read as 0)."""
        slot = i % keys.shape[0]
        mbarrier.expect(ready.index(slot), keys_desc.block_type.nbytes + scales_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(keys_desc, [key_row + i * BLOCK_N, 0], ready.index(slot), keys.index(slot),
                                        pred=pred)
        tma.async_copy_global_to_shared(scales_desc, [scale_row + i * BLOCK_N], ready.index(slot),
                                        scales.index(slot), pred=pred)

    @gluon.jit
    def _score(product, head_weight, k_scale, out_row, n, N, valid):
        """out[n] = k_scale[n] * sum over the heads of head_weight * ReLU(product[n, head]) for the rows n < N."""
        scores = gl.sum(gl.maximum(product, 0.0) * head_weight[None, :], axis=1) * k_scale
        gl.store(out_row + n, scores, mask=(n < N) & valid)
