"""When to take the Triton path: on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

Triton is an optional dependency (the ``triton`` extra); without it every kernel falls back to its torch reference.
Triton reads ``TRITON_INTERPRET`` when a function is decorated: :func:`run_on_interpreter` re-imports what it must.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

log = logging.getLogger(__name__)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Take the Triton path for these tensors (all on one device, checked by the caller)?"""
    if not HAS_TRITON:
        return False
    device = tensors[0].device
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division on host ints (``triton.cdiv`` is a slower wrapped function in recent Triton)."""
    return -(-a // b)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, for sizing grids (the interpreter runs programs one by one: there, few
    larger programs are faster)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


_COMPILED: dict[tuple, object] = {}
_DIRECT_LAUNCH = [True]
_PDL: dict[int, bool] = {}


def pdl_enabled(device_index: int) -> bool:
    """Launch with programmatic dependent launch (PDL) on this CUDA device? Hopper and later, unless
    ``TOPKLAB_PDL=0``. Each kernel then launches while its predecessor is still running and waits for it in
    :func:`pdl_enter`: the next launch's latency (a few microseconds, a decode step chains 6 of our kernels a
    layer) hides behind the running kernel."""
    enabled = _PDL.get(device_index)
    if enabled is None:
        enabled = (os.environ.get("TOPKLAB_PDL", "1") != "0"
                   and torch.cuda.get_device_capability(device_index)[0] >= 9)
        _PDL[device_index] = enabled
    return enabled


def launch(kernel, grid: tuple[int, ...], args: tuple, constants: dict, num_warps: int, num_stages: int = 3) -> None:
    """``kernel[grid](*args, **constants, num_warps=..., num_stages=...)`` with less host time per call.

    Triton's own launch path re-derives the specialisation of every argument in Python on each call (tens of
    microseconds on the H100 host, more than a decode step's kernels take at short contexts). Here the first call
    of each specialisation goes through it and keeps the compiled kernel; later calls with the same key launch it
    directly. The key holds everything Triton specialises on: each tensor's dtype and 16-byte alignment, each
    integer's 32/64-bit range and whether it is 1 or a multiple of 16 (for every integer: a superset of what
    ``do_not_specialize`` leaves), the constants and the launch options. ``constants`` must be the kernel's
    trailing ``tl.constexpr`` parameters, in order, but for the last, ``PDL``, which this sets (see
    :func:`pdl_enabled`; every kernel launched here calls :func:`pdl_enter` first). The interpreter always takes
    Triton's path.
    """
    if interpreting():
        kernel[grid](*args, **constants, PDL=False, num_warps=num_warps, num_stages=num_stages)
        return
    device_index = torch.cuda.current_device()
    constants = {**constants, "PDL": pdl_enabled(device_index)}
    key = [kernel, device_index, num_warps, num_stages, *constants.values()]
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append((arg.dtype, arg.data_ptr() % 16 == 0))
        elif isinstance(arg, bool) or not isinstance(arg, int):
            key.append(type(arg))
        else:
            key.append((arg == 1, arg % 16 == 0, -2**31 <= arg < 2**31))
    key = tuple(key)
    compiled = _COMPILED.get(key)
    if compiled is None or not _DIRECT_LAUNCH[0]:
        if list(constants) != kernel.arg_names[len(args):]:
            raise ValueError(f"launch({kernel.fn.__name__}): pass every runtime argument, then the constants "
                             f"{kernel.arg_names[len(args):]} in order; got {list(constants)}")
        compiled = kernel[grid](*args, **constants, num_warps=num_warps, num_stages=num_stages,
                                launch_pdl=constants["PDL"])
        _COMPILED[key] = compiled
        return
    try:
        compiled[(*grid, 1, 1)[:3]](*args, *constants.values())
    except TypeError as err:  # a Triton whose launcher takes other arguments: use its own path from now on
        log.warning("direct Triton launch failed (%s); using kernel[grid](...) from now on", err)
        _DIRECT_LAUNCH[0] = False
        kernel[grid](*args, **constants, num_warps=num_warps, num_stages=num_stages, launch_pdl=constants["PDL"])


if HAS_TRITON:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Under PDL, wait until the previous kernel in the stream has finished and its writes are visible."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def pdl_release(PDL: tl.constexpr):
        """Under PDL, let the next kernel in the stream launch (it waits for this one in its own :func:`pdl_wait`)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def pdl_enter(PDL: tl.constexpr):
        """First thing in every kernel: wait for the previous kernel, then let the next one launch. It waits here in
        turn, so completion stays ordered along the whole chain, and at most one kernel waits ahead: when a kernel
        runs, every kernel before its predecessor has finished, so it may read the chain's inputs before waiting."""
        pdl_wait(PDL)
        pdl_release(PDL)


    @triton.jit
    def prefetch_l2(ptrs):
        """Ask L2 for the 128-byte lines at ``ptrs`` without waiting for them: unlike a load, it holds no register,
        so a program can warm the lines it will read while it waits for an earlier kernel (see ``pdl_wait``)."""
        tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


KERNEL_MODULES = ("topklab.kernels._triton", "topklab.kernels.fp8_index", "topklab.kernels.topk",
                  "topklab.kernels.sparse_attention", "topklab.kernels")


@contextlib.contextmanager
def run_on_interpreter():
    """Within: Triton kernels run on CPU tensors through Triton's interpreter (how the CPU tests check them).

    Triton decides between compiler and interpreter when a function is decorated, its own library functions
    (``tl.sum``, ...) included, so this sets ``TRITON_INTERPRET=1`` and re-imports triton.language and the kernel
    modules; on exit it restores the variable and re-imports them again. Use the modules through
    ``sys.modules`` / ``importlib`` inside, since names imported before still point at the old functions.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: pip install 'topklab[triton]'")
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _reimport()
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
        _reimport()


def _reimport() -> None:
    import triton.language.standard

    importlib.reload(triton.language.standard)
    importlib.reload(triton.language)
    for name in KERNEL_MODULES:
        importlib.reload(importlib.import_module(name))
