"""The Gluon FP8 index kernel compiled offline for sm_90 at the benchmark's shapes: registers, spills, shared memory,
programs per SM, and how its loop waits for the FP8 wgmma (no GPU needed).

Why: the kernel exists to keep one product in flight while the epilogue of the previous one runs; the SASS shows
whether it does (``WARPGROUP.DEPBAR.LE gsb0, 0x1`` in the loop, where the Triton kernel has ``0x0`` after each
product) and whether the two live accumulators cost spills or programs per SM; and that the launcher's table of
programs per SM (``PROGRAMS_PER_SM``) agrees with every head-count and query-count it takes. Compile with the
device's Triton, installed aside (see ``kernel_resources.py``):

    PYTHONPATH=/tmp/triton36:.:benchmarks python benchmarks/compile_fp8_gluon.py [--sass-out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.experimental.gluon._runtime import GluonASTSource

import topklab.kernels.fp8_index_gluon as fp8_gluon
from kernel_resources import SM90, SMS, cuobjdump, programs_per_sm, resource_usage

CASES = ((16, 1, 131072), (16, 4, 131072))  # (batch, M, N) as in bench_kernels.bench_fp8
HEADS, D = 64, 128
TABLE_N = 131072


class _Recorder:
    """Stands in for the kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


@contextlib.contextmanager
def recorded_launches():
    """Within: the Gluon launcher takes its CUDA path on CPU tensors (132 SMs) and records its launches."""
    recorder = _Recorder(fp8_gluon._fp8_index_gluon_kernel)
    saved = {name: getattr(fp8_gluon, name) for name in ("_fp8_index_gluon_kernel", "gluon_supports", "sm_count")}
    fp8_gluon._fp8_index_gluon_kernel = recorder
    fp8_gluon.gluon_supports = lambda *tensors: True
    fp8_gluon.sm_count = lambda device: SMS
    try:
        yield recorder.launches
    finally:
        for name, value in saved.items():
            setattr(fp8_gluon, name, value)


def compile_gluon(kernel, args: tuple, kwargs: dict):
    """The launch compiled for sm_90 with the specialisation the JIT gives it (16-byte alignment, integers that are
    1 or multiples of 16, unless the kernel does not specialise on them)."""
    names = kernel.arg_names
    unspecialised = {names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, args)):
        kind, spec = native_specialize_impl(BaseBackend, value, False, name not in unspecialised, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = spec
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in kwargs.items():
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    source = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=SM90, options=options)


def loop_waits(sass: str) -> tuple[list[str], list[str]]:
    """The wgmma waits (``WARPGROUP.DEPBAR``, with their address) and wgmma instructions of the SASS, in order."""
    lines = [re.sub(r"\s*/\*\s*0x[0-9a-f]+\s*\*/\s*$", "", line).strip() for line in sass.splitlines()]
    waits = [line for line in lines if "WARPGROUP.DEPBAR" in line]
    products = [line for line in lines if re.search(r"[QH]GMMA\.", line)]
    return waits, products


def launch_of(batch: int, m: int, heads: int, n: int):
    """The launcher's (grid, args, kwargs) for these shapes, on empty CPU tensors."""
    q = torch.empty(batch, m, heads, D, dtype=torch.float8_e4m3fn)
    keys = torch.empty(batch, n, D, dtype=torch.float8_e4m3fn)
    with recorded_launches() as launches:
        fp8_gluon.fp8_index_scores_gluon(q, torch.ones(batch, m, heads), keys, torch.ones(batch, n),
                                         torch.ones(batch, m, heads))
    (launch,) = launches
    return launch


def check_table() -> None:
    """Each (BLOCK_H, queries) of PROGRAMS_PER_SM compiled: the programs an SM holds must match, with no spill."""
    for (block_h, queries), listed in fp8_gluon.PROGRAMS_PER_SM.items():
        _, args, kwargs = launch_of(16, queries, block_h, TABLE_N)
        usage = resource_usage(compile_gluon(fp8_gluon._fp8_index_gluon_kernel, args, dict(kwargs)))
        per_sm, limiter = programs_per_sm(usage, kwargs["num_warps"])
        verdict = "ok" if per_sm == listed and not usage.get("stack", 0) else "MISMATCH"
        print(f"  BLOCK_H {block_h:3d}, {queries} queries: {usage['reg']} registers, spill {usage.get('stack', 0)}, "
              f"{usage['shared'] / 1024:.1f} KiB -> {per_sm} programs/SM ({limiter}); table {listed}: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass-out", help="write each case's SASS and TTGIR to this folder")
    opts = parser.parse_args()
    print(f"Triton {triton.__version__}, Gluon kernel compiled for sm_90 ({SMS} SMs)")
    for batch, m, n in CASES:
        grid, args, kwargs = launch_of(batch, m, HEADS, n)
        constants = {key: value for key, value in kwargs.items() if key != "num_warps"}
        compiled = compile_gluon(fp8_gluon._fp8_index_gluon_kernel, args, dict(kwargs))
        usage = resource_usage(compiled)
        per_sm, limiter = programs_per_sm(usage, kwargs["num_warps"])
        sass = cuobjdump(compiled, "-sass")
        waits, products = loop_waits(sass)
        programs = grid[0] * grid[1] * grid[2]
        print(f"\nb{batch} M={m} N={n} H={HEADS}: grid {'x'.join(map(str, grid))} ({programs} programs), "
              f"{constants}, {kwargs['num_warps']} warps")
        print(f"  registers {usage['reg']}, spill bytes {usage.get('stack', 0)}, shared {usage['shared'] / 1024:.1f} "
              f"KiB, layout converts {usage['converts']}, programs/SM {per_sm} ({limiter}), waves "
              f"{programs / (per_sm * SMS):.2f}")
        shapes = sorted({re.search(r"[QH]GMMA\.\S+", line).group(0) for line in products})
        print(f"  {len(products)} wgmma instructions {shapes}; waits in program order:")
        for wait in waits:
            print(f"    {wait}")
        if opts.sass_out:
            os.makedirs(opts.sass_out, exist_ok=True)
            stem = os.path.join(opts.sass_out, f"fp8_gluon_b{batch}_m{m}")
            with open(stem + ".sass", "w") as f:
                f.write(sass)
            with open(stem + ".ttgir", "w") as f:
                f.write(compiled.asm["ttgir"])
    print("\nPROGRAMS_PER_SM against the compile:")
    check_table()


if __name__ == "__main__":
    main()
