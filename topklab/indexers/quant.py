"""Quantized dot-product scoring: ``quant``. Score every key from a low-bit copy, keep the best, optionally re-rank.

Keys (and, with ``quantize_queries=true``, queries) are rounded to ``dtype``: int8 ([-127, 127] x scale), int4
([-7, 7] x scale), fp8 (e4m3, |x| <= 448 x scale) or int1 (sign x scale, scale = mean |x|, the L2-best 1-bit code);
int scales are amax / 127 or 7 and fp8 scales amax / 448, as DeepSeek's indexer does. Scales are per token (one fp32
per key, over its d dims) or per channel (one per dim, over the build keys; ``add`` keeps them, so a decoded key
that exceeds a channel's range saturates). Queries are quantized per token. With ``rerank=r`` (r >= 1) the best
ceil(r*k) keys by quantized score are re-scored exactly from the full-precision keys and the k best of those kept.

The codes are simulated: values are rounded into the format and kept dequantized in float32, so the scores are those
the format gives, while the cost is accounted at the format's width. Cost per query: bytes_read = N*bits*d/8 (codes)
+ scales (N*4 per token or d*4 per channel) + ceil(r*k)*d*element size of the keys (re-ranking); keys_scored = keys
re-ranked (quantized scores are not full precision); index_bytes = codes + scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from topklab.indexers.base import KeyBuffer, StoredKeysIndexer, exact_scores
from topklab.indexers.registry import register
from topklab.kernels.fp8_index import FP8_DTYPE, FP8_MAX

#: dtype -> (bits per value, largest code magnitude; 0 for the 1-bit sign code)
FORMATS: dict[str, tuple[int, float]] = {"int8": (8, 127.0), "int4": (4, 7.0), "fp8": (8, FP8_MAX), "int1": (1, 0.0)}
SCALE_BYTES = 4


def quant_scale(x: torch.Tensor, dtype: str, dim: int) -> torch.Tensor:
    """fp32 scales of ``x`` along ``dim`` (kept): amax / largest code, or mean |x| for int1; 1 where x is all zero."""
    magnitude = x.float().abs()
    bits, largest = FORMATS[dtype]
    scale = magnitude.mean(dim, keepdim=True) if bits == 1 else magnitude.amax(dim, keepdim=True) / largest
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fake_quantize(x: torch.Tensor, dtype: str, scale: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to ``dtype`` codes at ``scale`` (broadcast), returned dequantized in float32."""
    scaled = x.float() / scale
    bits, largest = FORMATS[dtype]
    if bits == 1:
        codes = torch.where(scaled >= 0, 1.0, -1.0)
    elif dtype == "fp8":
        codes = scaled.clamp(-largest, largest).to(FP8_DTYPE).float()
    else:
        codes = scaled.round().clamp(-largest, largest)
    return codes * scale


def top_k_reranked(approx: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, k: int,
                   rerank: float) -> tuple[torch.Tensor, float]:
    """The k best keys by ``approx [*, M, N]`` (-inf marks a non-candidate), optionally re-ranked exactly.

    With ``rerank = 0``, the top k of ``approx``; with ``rerank = r >= 1``, the top k by exact q.k among the top
    ceil(r*k) of ``approx``. Ties in ``approx`` (common with integer LSH scores) go to the lower key index, so CPU and
    GPU select alike. Slots left without a candidate are -1. Returns (indices ``[*, M, k]``, keys scored exactly per
    query).
    """
    if rerank == 0:
        values, indices = _top(approx, k)
        return torch.where(values > -math.inf, indices, -1), 0.0
    values, shortlist = _top(approx, min(math.ceil(rerank * k), approx.shape[-1]))
    is_candidate = values > -math.inf
    m, d = shortlist.shape[-2], keys.shape[-1]
    rows = keys.unsqueeze(-3).expand(*keys.shape[:-2], m, *keys.shape[-2:])
    candidates = rows.gather(-2, shortlist.unsqueeze(-1).expand(*shortlist.shape, d))
    exact = torch.einsum("...md,...mcd->...mc", queries.float(), candidates.float())
    best_values, best = _top(exact.masked_fill(~is_candidate, -math.inf), k)
    scored = float(is_candidate.sum()) / max(1, is_candidate[..., 0].numel())
    return torch.where(best_values > -math.inf, shortlist.gather(-1, best), -1), scored


def _top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest along the last dim, ties to the lower index (torch.topk breaks ties
    differently on each device)."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def check_rerank(name: str, rerank: float) -> None:
    if rerank != 0 and rerank < 1:
        raise ValueError(f"{name}: rerank={rerank:g} must be 0 (off) or >= 1 (re-rank the best rerank*k candidates)")


@register
@dataclass
class Quant(StoredKeysIndexer):
    dtype: str = "int8"
    scale: str = "token"
    quantize_queries: bool = False
    rerank: float = 0.0

    name = "quant"
    choices = {"dtype": tuple(FORMATS), "scale": ("token", "channel")}
    examples = ("quant:dtype=int1", "quant:dtype=int1,rerank=4", "quant:dtype=int4")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rerank(self.name, self.rerank)

    def _build(self, keys: torch.Tensor) -> None:
        super()._build(keys)
        self._channel_scale = quant_scale(keys, self.dtype, dim=-2) if self.scale == "channel" else None
        self._quantized = KeyBuffer(self._quantize_keys(keys))
        self.cost.index_bytes = self._index_bytes(keys.shape[-2])

    def _add(self, keys: torch.Tensor) -> None:
        super()._add(keys)
        self._quantized.append(self._quantize_keys(keys))
        self.cost.index_bytes = self._index_bytes(self._quantized.n)

    def _quantize_keys(self, keys: torch.Tensor) -> torch.Tensor:
        scale = quant_scale(keys, self.dtype, dim=-1) if self._channel_scale is None else self._channel_scale
        return fake_quantize(keys, self.dtype, scale)

    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        if self.quantize_queries:
            queries_scored = fake_quantize(queries, self.dtype, quant_scale(queries, self.dtype, dim=-1))
        else:
            queries_scored = queries
        approx = exact_scores(queries_scored, self._quantized.data)
        keys = self.keys.data
        found, scored = top_k_reranked(approx, queries, keys, k, self.rerank)
        codes_and_scales = self._index_bytes(self.n) / self._lead.numel()
        self._charge(bytes_read=codes_and_scales + scored * self._dim * keys.element_size(), keys_scored=scored)
        return found

    def _index_bytes(self, n: int) -> int:
        """Codes plus scales, over all slices."""
        bits = FORMATS[self.dtype][0]
        scales = n if self.scale == "token" else self._dim
        return self._lead.numel() * (math.ceil(n * bits * self._dim / 8) + scales * SCALE_BYTES)
