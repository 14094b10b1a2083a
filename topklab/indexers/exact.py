"""The exact Top-k: score every key at full precision and keep the k best. The reference all others chase."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from topklab.indexers.base import StoredKeysIndexer, exact_scores
from topklab.indexers.registry import register
from topklab.kernels._triton import HAS_TRITON
from topklab.kernels.topk import topk as kernel_topk


def exact_topk(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) of the k highest q.k per query, best first, fp32 accumulation.

    On CUDA the Triton kernel (topklab.kernels.topk: about one read of K); elsewhere plain torch, the reference
    the kernel is tested against.
    """
    if keys.is_cuda and HAS_TRITON:
        if keys.dim() == 2:  # [N, d]: give the kernel a leading dim
            scores, indices = kernel_topk(queries.unsqueeze(0), keys.unsqueeze(0), k)
            return scores.squeeze(0), indices.squeeze(0)
        return kernel_topk(queries, keys, k)
    return torch.topk(exact_scores(queries, keys), k, dim=-1, sorted=True)


@register
@dataclass
class Exact(StoredKeysIndexer):
    name = "exact"
    examples = ("exact",)

    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        keys = self.keys.data
        self._charge(bytes_read=self.n * self._dim * keys.element_size(), keys_scored=self.n)
        return exact_topk(queries, keys, k)[1]
