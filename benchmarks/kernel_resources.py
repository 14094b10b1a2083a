"""Registers, spills, shared memory, layout conversions, occupancy of every Triton launch, for the H100, without a GPU.

Why: a kernel that spills or fits fewer programs per SM than its grid assumes explains a missed floor before any
device time is spent. The public wrappers (``topk``, ``topk_attention``, ``fp8_index_scores``) run on empty CPU
tensors of the benchmark shapes with ``launch`` replaced by a recorder, so every launch is the one the CUDA path
would make (grid, constants, warps, stages). Each is then compiled for sm_90 with the specialisation Triton gives it
at run time: 16-byte aligned tensors, integers that are 1 or multiples of 16 marked so (unless the kernel does not
specialise on them). Resource usage comes from ``cuobjdump`` in Triton's own toolchain. Registers, layouts and
occupancy differ between Triton versions, even in the direction of a change (the sure-winners branch: 114 -> 106
registers with Triton 3.9, 78 -> 96 with 3.6, measured slower on the GPU), so compile with the device's version,
installed aside: ``pip install --no-deps --target DIR triton==3.6.0``, then ``DIR`` first on PYTHONPATH.

    PYTHONPATH=. python3 benchmarks/kernel_resources.py [--only "topk b1 128K"] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 32)
SMS, REGISTERS_PER_SM, SHARED_PER_SM, MAX_WARPS_PER_SM = 132, 65536, 227 * 1024, 64  # H100 SXM
HQ, HKV, D = 32, 8, 128
KERNEL_MODULES = ("topklab.kernels.topk", "topklab.kernels.sparse_attention", "topklab.kernels.fp8_index")
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
                 torch.int64: "*i64", torch.float8_e4m3fn: "*fp8e4nv"}


@contextlib.contextmanager
def recorded_launches():
    """Within: the kernel modules take their CUDA path on CPU tensors (132 SMs, compiled numerics) and record each
    launch instead of running it. Yields the list the records go to."""
    records = []

    def record(kernel, grid, args, constants, num_warps, num_stages=3):
        records.append(dict(kernel=kernel, grid=grid, args=args, constants={**constants, "PDL": True},
                            num_warps=num_warps, num_stages=num_stages))

    patches = dict(launch=record, use_triton=lambda *tensors: True, interpreting=lambda: False,
                   sm_count=lambda device: SMS)
    saved = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, value in patches.items():
            if hasattr(module, attr):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, value)
    try:
        yield records
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def compile_launch(record: dict):
    """The launch compiled for sm_90 as Triton would specialise it at run time."""
    kernel = record["kernel"]
    names = kernel.arg_names
    unspecialised = {names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, record["args"])):
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and name not in unspecialised:
                signature[name], constexprs[(i,)] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in unspecialised:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    for name, value in record["constants"].items():
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=SM90, options=dict(num_warps=record["num_warps"],
                                                             num_stages=record["num_stages"]))


def cuobjdump(compiled, flag: str) -> str:
    """What ``cuobjdump flag`` (from Triton's own toolchain) prints for the compiled kernel's cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([tool, flag, cubin.name], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled) -> dict[str, int]:
    """Registers per thread and spill stack bytes (cuobjdump), SASS instructions (code that runs once through
    waits on instruction fetch: the finalize did for half its time on the H100), shared memory bytes (Triton's
    metadata), and the layout conversions in the TTGIR: each moves a tensor through shared memory between barriers,
    so one added inside a streaming loop costs time that registers do not show (the sure-winners branch: 2 -> 5 a
    tile, 30% slower)."""
    dump = cuobjdump(compiled, "--dump-resource-usage")
    usage = {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK):(\d+)", dump)}
    usage["instructions"] = len(re.findall(r"/\*[0-9a-f]{4,}\*/", cuobjdump(compiled, "-sass")))
    usage["shared"] = compiled.metadata.shared
    usage["converts"] = compiled.asm["ttgir"].count("ttg.convert_layout")
    return usage


def programs_per_sm(usage: dict[str, int], num_warps: int) -> tuple[int, str]:
    """Programs one SM holds at once, and what limits it."""
    threads = 32 * num_warps
    regs = -(-max(usage["reg"], 1) // 8) * 8
    limits = {"registers": REGISTERS_PER_SM // (regs * threads), "shared": SHARED_PER_SM // max(usage["shared"], 1),
              "warps": MAX_WARPS_PER_SM // num_warps}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def cases():
    """(label, thunk) per benchmark case; each thunk calls a public wrapper on empty CPU tensors."""
    from topklab.kernels import fp8_index_scores, topk, topk_attention

    def topk_case(batch, n, k, per_kv_head):
        q = torch.empty(batch, HQ, D, dtype=torch.bfloat16)
        keys = torch.empty(batch, HKV, n, D, dtype=torch.bfloat16)
        return lambda: topk(q, keys, k, sorted=False, per_kv_head=per_kv_head)

    def attention_case(n, k, per_kv_head):
        q = torch.empty(1, HQ, D, dtype=torch.bfloat16)
        keys, values = (torch.empty(1, HKV, n, D, dtype=torch.bfloat16) for _ in range(2))
        return lambda: topk_attention(q, keys, values, k, per_kv_head=per_kv_head)

    def fp8_case(batch, m, n, heads=64):
        q = torch.empty(batch, m, heads, D, dtype=torch.float8_e4m3fn)
        keys = torch.empty(batch, n, D, dtype=torch.float8_e4m3fn)
        scales = torch.ones(batch, m, heads), torch.ones(batch, n)
        return lambda: fp8_index_scores(q, scales[0], keys, scales[1], torch.ones(batch, m, heads))

    for batch, n, k in ((1, 8192, 64), (1, 8192, 2048), (1, 131072, 64), (1, 131072, 2048), (1, 131072, 8192),
                        (16, 131072, 2048)):
        for per_kv_head in (False, True):
            yield f"topk b{batch} {n // 1024}K k={k} {'per KV head' if per_kv_head else 'per q head'}", \
                topk_case(batch, n, k, per_kv_head)
    for per_kv_head in (False, True):
        yield f"select + attend b1 128K k=2048 {'per KV head' if per_kv_head else 'per q head'}", \
            attention_case(131072, 2048, per_kv_head)
    for m in (1, 4):
        yield f"fp8 index b16 M={m} 128K", fp8_case(16, m, 131072)


def main() -> None:
    from bench_kernels import write_lines  # the script's own folder is on the path when it runs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="the cases whose label contains this text (default: every case)")
    parser.add_argument("--out", help="write the markdown table here too")
    opts = parser.parse_args()
    rows = [f"Triton {triton.__version__}, compiled for sm_90 (H100: {SMS} SMs, {REGISTERS_PER_SM} registers and "
            f"{SHARED_PER_SM // 1024} KiB shared memory per SM)", "",
            "| case | kernel | grid | warps | stages | registers | spill bytes | instructions | shared KiB "
            "| layout converts | programs/SM (limit) | waves |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    print("\n".join(rows), flush=True)
    compiled_cache = {}
    for label, call in cases():
        if opts.only and opts.only not in label:
            continue
        with recorded_launches() as records:
            call()
        for record in records:
            key = (record["kernel"], record["num_warps"], record["num_stages"],
                   tuple(record["constants"].items()))
            if key not in compiled_cache:
                compiled_cache[key] = resource_usage(compile_launch(record))
            usage = compiled_cache[key]
            per_sm, limiter = programs_per_sm(usage, record["num_warps"])
            programs = 1
            for extent in record["grid"]:
                programs *= extent
            waves = programs / (per_sm * SMS) if per_sm else float("inf")
            rows.append(f"| {label} | {record['kernel'].fn.__name__} | {'x'.join(map(str, record['grid']))} | "
                        f"{record['num_warps']} | {record['num_stages']} | {usage['reg']} | {usage.get('stack', 0)} "
                        f"| {usage['instructions']} | {usage['shared'] / 1024:.1f} | {usage['converts']} "
                        f"| {per_sm} ({limiter}) | {waves:.2f} |")
            print(rows[-1], flush=True)
    write_lines(opts.out, rows)


if __name__ == "__main__":
    main()
