"""Benchmark the Triton kernels against the plain torch way and the memory floor, in one run on one GPU.

Exact Top-k (one decode step, 32 query heads over 8 KV heads, d = 128, bf16): N in {8K, 32K, 128K, 512K}, k in
{64, 2048, N/16}, batch 1 and 16. Ours (unsorted) vs q.K^T + torch.topk (unsorted too), and vs the floor: K's bytes
at the copy bandwidth measured in the same run (bytes read + written by a large device copy), the issue's floor.
A read-only stream goes faster than a copy on the H100 (dense SDPA read ~8% above it at batch 16), so the ratio to
the read bandwidth measured in the same run (a large bf16 sum) is listed too: the stricter floor. Select + attend
vs dense SDPA decode on the same cache (with the read rate SDPA reached). FP8 index scoring vs its floor (the larger
of the memory and the FP8 tensor-core floors).

Each time is the median replay of a CUDA graph (a decode loop captures its step; launch gaps stay out), over
enough copies of the inputs to exceed the L2 cache. Eager times (Python launch included) are listed for Top-k.

    PYTHONPATH=. python3 benchmarks/bench_kernels.py --out benchmarks/out.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import statistics

import torch
import torch.nn.functional as F
import triton

from topklab.kernels import fp8_index_scores, hadamard_rotate, quantize_fp8, topk, topk_attention
from topklab.kernels.topk import clear_scratch

HQ, HKV, D = 32, 8, 128
L2_BYTES = 50 * 2**20


def graph_time(fn, sets, reps: int = 20) -> float:
    """Seconds per call: a CUDA graph runs fn over every input set once; median replay / len(sets)."""
    for args in sets:  # compile and allocate outside the graph
        fn(*args)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in sets:
            fn(*args)
    seconds = replay_seconds(graph, reps)
    del graph
    return seconds / len(sets)


def replay_seconds(graph: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    """Median seconds of one replay of ``graph`` (after one untimed replay), timed by CUDA events."""
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def eager_time(fn, args) -> float:
    return triton.testing.do_bench(lambda: fn(*args), warmup=25, rep=100, return_mode="median") / 1e3


def copy_bandwidth() -> float:
    """Bytes read + written per second by device-to-device copies of 256 MiB to 4 GiB (the best of them)."""
    best = 0.0
    for size in (2**28, 2**30, 2**32):
        src = torch.randn(size // 4, device="cuda")
        dst = torch.empty_like(src)
        best = max(best, 2 * size / graph_time(lambda: dst.copy_(src), [()]))
        del src, dst
    return best


def read_bandwidth() -> float:
    """Bytes read per second by a sum over bf16 buffers of 256 MiB to 4 GiB (the best of them): a read-only stream,
    like the Top-k score pass."""
    best = 0.0
    for size in (2**28, 2**30, 2**32):
        src = torch.randn(size // 2, device="cuda", dtype=torch.bfloat16)
        best = max(best, size / graph_time(lambda: src.sum(dtype=torch.float32), [()]))
        del src
    return best


def fp8_peak() -> float:
    """FP8 tensor-core FLOP/s of a large torch._scaled_mm (the compute floor of index scoring)."""
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    seconds = graph_time(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), [()])
    return 2 * n**3 / seconds


def write_lines(path: str | None, lines: list[str]) -> None:
    """The table's lines to ``path`` (nothing without one)."""
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")


def n_sets(bytes_per_set: int) -> int:
    return max(1, min(8, math.ceil(4 * L2_BYTES / bytes_per_set)))


def plain_topk(q, keys, k):
    """The plain way: bf16 q.K^T per KV group, then torch.topk (unsorted, as ours is timed)."""
    b = q.shape[0]
    scores = torch.matmul(q.view(b, HKV, HQ // HKV, D), keys.transpose(-1, -2))
    return torch.topk(scores, k, dim=-1, sorted=False)


def dense_decode(q, keys, values):
    return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, enable_gqa=True)


def bench_topk(bw: float, read_bw: float, batches, lengths_n, rows: list[str], ours_only: bool = False) -> None:
    """A row per (batch, N, k); with ``ours_only`` the sorted, eager and plain columns are skipped (nan): an A/B
    of kernel variants in a third of the time."""
    for batch in batches:
        for n in lengths_n:
            key_bytes = batch * HKV * n * D * 2
            sets = [(torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16),
                     torch.randn(batch, HKV, n, D, device="cuda", dtype=torch.bfloat16))
                    for _ in range(n_sets(key_bytes))]
            floor = key_bytes / bw
            for k in sorted({64, 2048, n // 16}):
                ours = graph_time(lambda q, keys: topk(q, keys, k, sorted=False), sets)
                per_kv = graph_time(lambda q, keys: topk(q, keys, k, sorted=False, per_kv_head=True), sets)
                ours_sorted = plain = eager = math.nan
                if not ours_only:
                    ours_sorted = graph_time(lambda q, keys: topk(q, keys, k, sorted=True), sets)
                    plain = graph_time(lambda q, keys: plain_topk(q, keys, k), sets)
                    eager = eager_time(lambda q, keys: topk(q, keys, k, sorted=False), sets[0])
                rows.append(f"| {batch} | {n // 1024}K | {k} | {floor * 1e6:.1f} | {ours * 1e6:.1f} | "
                            f"{ours / floor:.2f} | {ours * read_bw / key_bytes:.2f} | {per_kv * 1e6:.1f} | "
                            f"{per_kv / floor:.2f} | "
                            f"{ours_sorted * 1e6:.1f} | {eager * 1e6:.1f} | {plain * 1e6:.1f} | "
                            f"{plain / ours:.2f} |")
                print(rows[-1], flush=True)
            del sets
            clear_scratch()
            torch.cuda.empty_cache()


def bench_attention(bw: float, batches, lengths_n, k: int, rows: list[str]) -> None:
    for batch in batches:
        for n in lengths_n:
            kv_bytes = 2 * batch * HKV * n * D * 2
            sets = [(torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16),
                     torch.randn(batch, HKV, n, D, device="cuda", dtype=torch.bfloat16),
                     torch.randn(batch, HKV, n, D, device="cuda", dtype=torch.bfloat16))
                    for _ in range(n_sets(kv_bytes))]
            dense = graph_time(dense_decode, sets)
            per_q = graph_time(lambda q, keys, values: topk_attention(q, keys, values, k), sets)
            per_kv = graph_time(lambda q, keys, values: topk_attention(q, keys, values, k, per_kv_head=True), sets)
            rows.append(f"| {batch} | {n // 1024}K | {k} | {kv_bytes / bw * 1e6:.1f} | {dense * 1e6:.1f} | "
                        f"{kv_bytes / dense / 1e12:.2f} | {per_q * 1e6:.1f} | {per_q / dense:.2f} | "
                        f"{per_kv * 1e6:.1f} | {per_kv / dense:.2f} |")
            print(rows[-1], flush=True)
            del sets
            clear_scratch()
            torch.cuda.empty_cache()


FP8_HEADS = 64


def fp8_inputs(batch: int, m: int, n: int, heads: int = FP8_HEADS) -> tuple[torch.Tensor, ...]:
    """Seeded Hadamard-rotated FP8 index queries and keys with their scales, and head weights: the kernel's args."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q_fp8, q_scale = quantize_fp8(hadamard_rotate(torch.randn(batch, m, heads, D, device="cuda", generator=gen)))
    k_fp8, k_scale = quantize_fp8(hadamard_rotate(torch.randn(batch, n, D, device="cuda", generator=gen)))
    weights = torch.randn(batch, m, heads, device="cuda", generator=gen)
    return q_fp8, q_scale[..., 0], k_fp8, k_scale[..., 0], weights


def fp8_floors(batch: int, m: int, n: int, bw: float, peak: float, heads: int = FP8_HEADS) -> tuple[float, float]:
    """Seconds to move FP8 index scoring's bytes at ``bw``, and to do its FLOPs at ``peak``."""
    moved = batch * n * (D + 4) + batch * m * n * 4 + batch * m * heads * (D + 8)
    return moved / bw, 2 * batch * m * heads * n * D / peak


@contextlib.contextmanager
def fp8_kernel(gluon: bool):
    """Within: fp8_index_scores takes the Gluon kernel where it fits (``gluon``), else the Triton kernel."""
    saved = os.environ.get("TOPKLAB_FP8_GLUON")
    os.environ["TOPKLAB_FP8_GLUON"] = "1" if gluon else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TOPKLAB_FP8_GLUON"]
        else:
            os.environ["TOPKLAB_FP8_GLUON"] = saved


def settle_fp8_inputs(sets) -> None:
    """200 untimed graph replays of the Triton FP8 kernel over freshly made FP8 inputs: on the H100 the first ~50
    replays over them ran ~12% slower (113-117 us, then 102-105, b16 M = 1 128K; Top-k and SDPA inputs showed no
    such gap), which would tilt a comparison against whatever is timed first."""
    with fp8_kernel(False):
        graph_time(fp8_index_scores, sets, reps=200)


def bench_fp8(bw: float, peak: float, rows: list[str]) -> None:
    """Ours (the Gluon kernel on Hopper), and the Triton kernel it replaces there, on the same inputs: each timed
    twice, interleaved, the faster kept (both in the log)."""
    for batch, m, n in ((16, 1, 32768), (16, 1, 131072), (16, 4, 131072), (64, 1, 65536)):
        memory, compute = fp8_floors(batch, m, n, bw, peak)
        floor = max(memory, compute)
        sets = [fp8_inputs(batch, m, n) for _ in range(n_sets(batch * n * (D + 4)))]  # K past L2, as elsewhere
        row = f"| {batch} | {m} | {FP8_HEADS} | {n // 1024}K | {memory * 1e6:.1f} | {compute * 1e6:.1f} |"
        settle_fp8_inputs(sets)
        times = {True: [], False: []}
        for gluon in (True, False, False, True):  # interleaved: whichever runs first is not favoured
            with fp8_kernel(gluon):
                times[gluon].append(graph_time(fp8_index_scores, sets))
        print(f"FP8 b{batch} M={m} N={n}: Gluon " + " / ".join(f"{t * 1e6:.1f}" for t in times[True])
              + " us, Triton " + " / ".join(f"{t * 1e6:.1f}" for t in times[False]) + " us", flush=True)
        for gluon in (True, False):
            seconds = min(times[gluon])
            row += f" {seconds * 1e6:.1f} | {seconds / floor:.2f} |"
        rows.append(row)
        print(rows[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown tables here")
    parser.add_argument("--quick", action="store_true", help="batch 1, N <= 128K only")
    parser.add_argument("--batches", help="comma-separated batch sizes (overrides --quick)")
    parser.add_argument("--lengths", help="comma-separated N (overrides --quick)")
    parser.add_argument("--no-fp8", action="store_true", help="skip FP8 index scoring")
    parser.add_argument("--fp8-only", action="store_true", help="FP8 index scoring only (no Top-k, no attention)")
    parser.add_argument("--ours-only", action="store_true",
                        help="Top-k: only our unsorted times (per query and per KV head), for A/B runs of variants")
    args = parser.parse_args()
    torch.manual_seed(0)
    bw, read_bw, peak = copy_bandwidth(), read_bandwidth(), fp8_peak()
    card = torch.cuda.get_device_name()
    header = [f"Card: {card}; {datetime.date.today().isoformat()}; torch {torch.__version__}, triton "
              f"{triton.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write), read bandwidth "
              f"{read_bw / 1e12:.2f} TB/s (a bf16 sum); FP8 matmul "
              f"{peak / 1e12:.0f} TFLOP/s.", ""]
    batches = (1,) if args.quick else (1, 16)
    lengths_n = (8192, 32768, 131072) if args.quick else (8192, 32768, 131072, 524288)
    if args.batches:
        batches = tuple(int(b) for b in args.batches.split(","))
    if args.lengths:
        lengths_n = tuple(int(n) for n in args.lengths.split(","))
    sections = []
    if not args.fp8_only:
        topk_rows = ["| batch | N | k | K-read floor us | ours us | ours/floor | ours/read floor | "
                     "ours per KV head us | /floor | "
                     "ours sorted us | ours eager us | q.K^T+torch.topk us | torch/ours |",
                     "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        print("\n".join(header + topk_rows), flush=True)
        bench_topk(bw, read_bw, batches, lengths_n, topk_rows, args.ours_only)
        attn_rows = ["| batch | N | k | K+V floor us | dense SDPA us | SDPA reads TB/s | "
                     "select+attend (per q head) us | /SDPA | select+attend (per KV head) us | /SDPA |",
                     "|---|---|---|---|---|---|---|---|---|---|"]
        print("\n".join(attn_rows), flush=True)
        bench_attention(bw, batches, lengths_n, 2048, attn_rows)
        sections += ["Exact Top-k (one decode step, 32 q heads / 8 KV heads, d=128, bf16):", ""] + topk_rows
        sections += ["", "Select + attend, k = 2048:", ""] + attn_rows
    if not args.no_fp8:
        fp8_rows = ["| batch | M | index heads | N | memory floor us | FP8 compute floor us | ours us | ours/floor | "
                    "Triton kernel us | /floor |", "|---|---|---|---|---|---|---|---|---|---|"]
        print("\n".join(fp8_rows), flush=True)
        bench_fp8(bw, peak, fp8_rows)
        sections += ["", "FP8 index scoring, d = 128:", ""] + fp8_rows
    print("\n".join(header + sections))
    write_lines(args.out, header + sections)


if __name__ == "__main__":
    main()
