"""Input checks shared by indexers, metrics and kernels.

Every public entry point validates its tensors here so that bad input fails early with a message that says what
was wrong and how to fix it, instead of a silent wrong answer or a crash deep inside a kernel.
"""

from __future__ import annotations

import torch


def check_k(k: int, n: int, what: str = "keys") -> int:
    """k must be an int in [1, n]."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__} ({k!r})")
    if n <= 0:
        raise ValueError(f"there are no {what} to select from (N = 0): build the index on a non-empty cache first")
    if k <= 0 or k > n:
        raise ValueError(f"k must be in [1, N] = [1, {n}], got k = {k}; choose a smaller k or a longer context")
    return k


def check_finite(t: torch.Tensor, name: str) -> None:
    """Reject NaN or Inf, which would make any Top-k selection meaningless."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); check the model's numerics or the trace file")


def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_vectors(t: torch.Tensor, name: str, min_dim: int = 2) -> None:
    """A [*, n, d] floating-point tensor with finite entries."""
    check_float(t, name)
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have shape [*, n, d] (at least {min_dim} dims), got {tuple(t.shape)}")
    check_finite(t, name)


def check_pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str, same_dtype: bool = False) -> None:
    """Queries and keys: same leading (batch x head) dims, same head dim, same device."""
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; move both to one device")
    if same_dtype and a.dtype != b.dtype:
        raise ValueError(f"{name_a} has dtype {a.dtype} but {name_b} has {b.dtype}; cast one of them")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"head dim mismatch: {name_a} has d = {a.shape[-1]}, {name_b} has d = {b.shape[-1]}")
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(
            f"leading (batch x head) dims differ: {name_a} {tuple(a.shape[:-2])} vs {name_b} {tuple(b.shape[:-2])}; "
            "for GQA, fold the query heads of one KV head into the query axis ([B, H_kv, G*M, d])"
        )


def check_indices(idx: torch.Tensor, name: str, lead: torch.Size | None = None) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer (int64/int32) tensor of key indices")
    if lead is not None and idx.shape[:-1] != lead:
        raise ValueError(f"{name} has leading dims {tuple(idx.shape[:-1])}, expected {tuple(lead)}")
