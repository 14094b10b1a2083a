"""When to take the Triton path: on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

Triton is an optional dependency (the ``triton`` extra); without it every kernel falls back to its torch reference.
Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so the kernel modules must be (re)imported after it is
set for the interpreter to take effect (the tests do this).
"""

from __future__ import annotations

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
