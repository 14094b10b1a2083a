"""Where the time of one Top-k decode step goes.

Per case: the GPU time of each kernel (torch.profiler, per call), the whole call replayed in a CUDA
graph over enough input copies to exceed the L2 cache (as bench_kernels.py), and the host time per call: wall time
to enqueue ``calls`` calls without waiting, of which the Triton launches (``JITFunction.run``, timed by a wrapper).

    PYTHONPATH=. python3 benchmarks/profile_kernels.py --out /tmp/profile.md
"""

from __future__ import annotations

import argparse
import collections
import importlib
import time

import torch
from bench_kernels import graph_time, n_sets, write_lines
from torch.profiler import ProfilerActivity, profile

from topklab.kernels import topk, topk_attention

topk_module = importlib.import_module("topklab.kernels.topk")
clear_scratch = topk_module.clear_scratch
attention_module = importlib.import_module("topklab.kernels.sparse_attention")

HQ, HKV, D = 32, 8, 128
CASES = (  # (what, batch, N, k)
    ("topk", 1, 8192, 64), ("topk", 1, 8192, 512), ("topk", 1, 8192, 2048), ("topk", 16, 8192, 2048),
    ("topk", 1, 131072, 64), ("topk", 1, 131072, 2048),
    ("topk", 1, 131072, 8192), ("topk", 16, 131072, 2048), ("topk", 16, 131072, 8192),
    ("attn", 1, 131072, 2048), ("attn-kv", 1, 131072, 2048),
)
def make_sets(what: str, batch: int, n: int, k: int):
    tensors = 2 if what == "topk" else 3
    count = n_sets((tensors - 1) * batch * HKV * n * D * 2)  # K (and V); q is small
    sets = [(torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16),
             *(torch.randn(batch, HKV, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(tensors - 1)))
            for _ in range(count)]
    if what == "topk":
        return sets, lambda q, keys: topk(q, keys, k, sorted=False)
    return sets, lambda q, keys, values: topk_attention(q, keys, values, k, per_kv_head=what == "attn-kv")


def gpu_kernel_times(fn, sets, reps: int = 24) -> dict[str, float]:
    """us of CUDA time per call, by kernel name; the calls go round the input sets, so that K comes from HBM as in
    the graph timing (one set repeated would sit in L2 at 8K: 16 MiB)."""
    for args in sets:
        fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for rep in range(reps):
            fn(*sets[rep % len(sets)])
        torch.cuda.synchronize()
    times = collections.Counter()
    for event in prof.key_averages():
        total = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if total and event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.key[:24]] += total / reps
    return dict(times)


class LaunchTimer:
    """Wraps every Triton kernel's ``run`` in the kernel modules to sum the host time spent launching."""

    def __init__(self):
        self.seconds = 0.0
        self.count = 0
        kernels = {id(value): value for module in (topk_module, attention_module) for value in vars(module).values()
                   if hasattr(value, "run") and hasattr(value, "device_caches")}  # once each (pdl_enter is in both)
        self.kernels = list(kernels.values())

    def __enter__(self):
        for kernel in self.kernels:
            def timed(*args, _original=kernel.run, **kwargs):
                begin = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - begin
                    self.count += 1

            kernel.run = timed
        return self

    def __exit__(self, *exc):
        for kernel in self.kernels:
            del kernel.run


def host_time(fn, args, calls: int = 30) -> tuple[float, float, float]:
    """(host us per call, of which Triton launches us, launches per call), enqueue-only."""
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    with LaunchTimer() as timer:
        begin = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        host = time.perf_counter() - begin
    torch.cuda.synchronize()
    return 1e6 * host / calls, 1e6 * timer.seconds / calls, timer.count / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--batches", default="1,16", help="the cases of these batch sizes (comma-separated)")
    args = parser.parse_args()
    batches = {int(b) for b in args.batches.split(",")}
    torch.manual_seed(0)
    lines = [f"Card: {torch.cuda.get_device_name()}", "",
             "| case | batch | N | k | GPU us per kernel (profiler) | graph us/call | host us/call | launches us | "
             "launches |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for what, batch, n, k in CASES:
        if batch not in batches:
            continue
        sets, fn = make_sets(what, batch, n, k)
        kernels = gpu_kernel_times(fn, sets)
        graph = graph_time(fn, sets)
        host, launches, count = host_time(fn, sets[0])
        per_kernel = ", ".join(f"{key} {us:.1f}" for key, us in sorted(kernels.items(), key=lambda x: -x[1]))
        lines.append(f"| {what} | {batch} | {n // 1024}K | {k} | {per_kernel} | {graph * 1e6:.1f} | {host:.1f} | "
                     f"{launches:.1f} | {count:.0f} |")
        print(lines[-1], flush=True)
        del sets
        clear_scratch()
        torch.cuda.empty_cache()
    write_lines(args.out, lines)


if __name__ == "__main__":
    main()
