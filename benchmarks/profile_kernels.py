"""Where the time of one Top-k decode step goes: GPU time per kernel, and host (Python + launch) time per call.

- GPU: torch.profiler over a CUDA-graph-free loop; the CUDA kernel time of each kernel name, per call.
- Host: wall time to enqueue ``calls`` calls without waiting (the GPU runs behind, so this is the host's own cost
  per call when it exceeds the GPU time), split into the Triton launches (``JITFunction.run``, timed by a
  wrapper) and the rest (argument checks, torch allocations and views).

    PYTHONPATH=. python3 benchmarks/profile_kernels.py --out /tmp/profile.md
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from topklab.kernels import sparse_attention, topk, topk_attention
from topklab.kernels import topk as topk_module

HQ, HKV, D = 32, 8, 128
CASES = (  # (what, batch, N, k)
    ("topk", 1, 8192, 64), ("topk", 1, 8192, 2048), ("topk", 1, 131072, 2048), ("topk", 1, 131072, 8192),
    ("topk", 16, 131072, 2048), ("attn", 1, 131072, 2048), ("attn-kv", 1, 131072, 2048),
)


def make_call(what: str, batch: int, n: int, k: int):
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(batch, HKV, n, D, device="cuda", dtype=torch.bfloat16)
    if what == "topk":
        return lambda: topk(q, keys, k, sorted=False)
    values = torch.randn_like(keys)
    return lambda: topk_attention(q, keys, values, k, per_kv_head=what == "attn-kv")


def gpu_kernel_times(call, reps: int = 20) -> dict[str, float]:
    """us of CUDA time per call, by kernel name."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    times = collections.Counter()
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA or getattr(event, "self_device_time_total", 0):
            total = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
            if total:
                times[event.key[:40]] += total / reps
    return dict(times)


class LaunchTimer:
    """Wraps every Triton kernel's ``run`` of the kernel modules to sum the host time spent launching."""

    def __init__(self):
        self.seconds = 0.0
        self.count = 0
        self.kernels = []
        for module in (topk_module, sparse_attention):
            for value in vars(module).values():
                if hasattr(value, "run") and hasattr(value, "fn") and hasattr(value, "device_caches"):
                    self.kernels.append(value)

    def __enter__(self):
        for kernel in self.kernels:
            original = kernel.run

            def timed(*args, _original=original, **kwargs):
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


def host_time(call, calls: int = 30) -> tuple[float, float, float]:
    """(host us per call, of which Triton launches us, launches per call), enqueue-only."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with LaunchTimer() as timer:
        begin = time.perf_counter()
        for _ in range(calls):
            call()
        host = time.perf_counter() - begin
    torch.cuda.synchronize()
    return 1e6 * host / calls, 1e6 * timer.seconds / calls, timer.count / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--collect-warps", type=int, nargs="*", default=[4], help="also try these warp counts")
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [f"Card: {torch.cuda.get_device_name()}", "",
             "| case | batch | N | k | GPU us per kernel | GPU total us | host us/call | of which launches us | "
             "launches |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    default_warps = topk_module.COLLECT_WARPS
    for what, batch, n, k in CASES:
        call = make_call(what, batch, n, k)
        for warps in sorted({default_warps, *args.collect_warps}) if what == "topk" else (default_warps,):
            topk_module.COLLECT_WARPS = warps
            kernels = gpu_kernel_times(call)
            host, launches, count = host_time(call)
            per_kernel = ", ".join(f"{name} {us:.1f}" for name, us in sorted(kernels.items(), key=lambda x: -x[1]))
            lines.append(f"| {what} (collect warps {warps}) | {batch} | {n // 1024}K | {k} | {per_kernel} | "
                         f"{sum(kernels.values()):.1f} | {host:.1f} | {launches:.1f} | {count:.0f} |")
            print(lines[-1], flush=True)
        topk_module.COLLECT_WARPS = default_warps
        del call
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
