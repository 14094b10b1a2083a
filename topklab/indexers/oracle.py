"""Controlled fidelity: an indexer whose recall@k is exactly p, the study's precision sweep.

Of the k returned indices, round(p*k) come from the true Top-k (a random subset, or the best ones with
``keep=top``) and the rest from outside it: uniformly at random (``fill=random``) or the ranks just below k
(``fill=next``, the hardest near-misses). Seeded, so a sweep is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from topklab.indexers.base import StoredKeysIndexer, exact_scores
from topklab.indexers.registry import register


@register
@dataclass
class Oracle(StoredKeysIndexer):
    p: float = 1.0
    fill: str = "random"
    keep: str = "random"
    seed: int = 0

    name = "oracle"
    choices = {"fill": ("random", "next"), "keep": ("random", "top")}
    examples = ("oracle:p=0.5",)
    stochastic = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"oracle: p must be in [0, 1], got {self.p}")

    def _build(self, keys: torch.Tensor) -> None:
        super()._build(keys)
        self._generator = torch.Generator().manual_seed(self.seed)

    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        n_true = round(self.p * k)
        n_fill = k - n_true
        if n_fill > self.n - k:
            raise ValueError(
                f"oracle:p={self.p:g} at k={k} needs {n_fill} keys outside the true Top-k but only {self.n - k} "
                f"exist (N={self.n}); use k <= N/2 or a larger p"
            )
        keys = self.keys.data
        self._charge(bytes_read=self.n * self._dim * keys.element_size(), keys_scored=self.n)
        order = torch.sort(exact_scores(queries, keys), dim=-1, descending=True, stable=True).indices
        rows = order.reshape(-1, self.n)
        true_ranks = self._pick(rows.shape[0], k, n_true, top=self.keep == "top")
        if self.fill == "next":
            fill_ranks = torch.arange(k, k + n_fill).expand(rows.shape[0], n_fill)
        else:
            fill_ranks = k + self._pick(rows.shape[0], self.n - k, n_fill, top=False)
        ranks = torch.cat([true_ranks, fill_ranks], dim=-1).to(rows.device)
        return rows.gather(-1, ranks).reshape(*queries.shape[:-1], k)

    def _pick(self, rows: int, population: int, count: int, top: bool) -> torch.Tensor:
        """``count`` distinct ranks in [0, population) per row: the first ones, or a seeded random subset (sorted)."""
        if top or count == 0:
            return torch.arange(count).expand(rows, count)
        noise = torch.rand(rows, population, generator=self._generator)
        return noise.topk(count, dim=-1).indices.sort(dim=-1).values
