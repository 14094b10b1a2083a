"""When to take the Triton path: on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

Triton is an optional dependency (the ``triton`` extra); without it every kernel falls back to its torch reference.
Triton reads ``TRITON_INTERPRET`` when a function is decorated: :func:`run_on_interpreter` re-imports what it must.
"""

from __future__ import annotations

import contextlib
import importlib
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


KERNEL_MODULES = ("topklab.kernels.fp8_index", "topklab.kernels.topk", "topklab.kernels.sparse_attention",
                  "topklab.kernels")


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
