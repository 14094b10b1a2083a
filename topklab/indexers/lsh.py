"""SimHash LSH over the keys (signed random projections, as in MagicPIG): ``lsh``. Plain torch, CPU or GPU.

Each of ``tables`` hash tables draws ``bits`` random hyperplanes (Gaussian, seeded with ``seed``); a vector's code in
a table is the bits of which side of each plane it lies on, so two vectors agree on a bit with probability
1 - angle / pi. ``rank=collisions`` ranks keys by the number of tables where the key's code equals the query's (the
LSH bucket collisions), ties broken by the number of agreeing bits; keys that collide in no table are not
candidates, and slots left without one are -1. ``rank=hamming`` ranks every key by agreeing bits over all
tables x bits (the SimHash estimate of the angle; the split into tables does not matter there). With ``rerank=r``
(r >= 1) the best ceil(r*k) are re-scored exactly and the k best kept. SimHash sees angles, not norms, so keys
with large norms are under-ranked without re-ranking: that is the method, and the study measures it.

Cost per query: bytes_read = N * tables*bits/8 (every key's codes, counted bit-packed, although they are held as +-1
floats so that comparing codes is a matrix product) + candidates re-scored x d x the keys' element size;
keys_scored = candidates re-scored; index_bytes = codes (bit-packed) + the hyperplanes (tables*bits*d*4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from topklab.indexers.base import KeyBuffer, StoredKeysIndexer
from topklab.indexers.quant import check_rerank, top_k_reranked
from topklab.indexers.registry import register

PLANE_BYTES = 4
MAX_BUCKET_BITS = 62


@register
@dataclass
class LSH(StoredKeysIndexer):
    tables: int = 8
    bits: int = 8
    rank: str = "hamming"
    rerank: float = 0.0
    seed: int = 0

    name = "lsh"
    choices = {"rank": ("collisions", "hamming")}
    examples = ("lsh:tables=8,bits=8", "lsh:tables=16,bits=16,rerank=2", "lsh:tables=32,bits=16,rerank=4")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tables < 1:
            raise ValueError(f"lsh: tables must be >= 1, got tables={self.tables}")
        if self.bits < 1:
            raise ValueError(f"lsh: bits must be >= 1 (hyperplanes per table), got bits={self.bits}")
        if self.rank == "collisions" and self.bits > MAX_BUCKET_BITS:
            raise ValueError(f"lsh: rank=collisions packs a table's code into one int64, so bits must be <= "
                             f"{MAX_BUCKET_BITS}, got {self.bits}; use more tables or rank=hamming")
        check_rerank(self.name, self.rerank)

    def _build(self, keys: torch.Tensor) -> None:
        super()._build(keys)
        generator = torch.Generator().manual_seed(self.seed)
        self._planes = torch.randn(self.tables, self.bits, keys.shape[-1], generator=generator).to(keys.device)
        self._codes = KeyBuffer(self._hash(keys))
        self.cost.index_bytes = self._index_bytes()

    def _add(self, keys: torch.Tensor) -> None:
        super()._add(keys)
        self._codes.append(self._hash(keys))
        self.cost.index_bytes = self._index_bytes()

    def _hash(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``[*, n, tables*bits]`` as +-1 (+1: x lies on the positive side of the plane), so that the dot
        product of two codes is (agreeing - disagreeing) bits and comparing codes is a matrix product."""
        side = torch.matmul(x.float(), self._planes.reshape(-1, x.shape[-1]).T)
        return torch.where(side > 0, 1.0, -1.0)

    def _buckets(self, codes: torch.Tensor) -> torch.Tensor:
        """Each table's code packed into one int64 bucket id: ``[*, n, tables]``."""
        bit_values = 2 ** torch.arange(self.bits, dtype=torch.int64, device=codes.device)
        return ((codes.unflatten(-1, (self.tables, self.bits)) > 0).long() * bit_values).sum(-1)

    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        query_codes, key_codes = self._hash(queries), self._codes.data
        agreeing_bits = (torch.matmul(query_codes, key_codes.transpose(-1, -2)) + self.tables * self.bits) / 2
        if self.rank == "collisions":
            collisions = (self._buckets(query_codes).unsqueeze(-2) == self._buckets(key_codes).unsqueeze(-3)).sum(-1)
            approx = collisions * (self.tables * self.bits + 1) + agreeing_bits
            approx = approx.masked_fill(collisions == 0, -math.inf)
        else:
            approx = agreeing_bits
        keys = self.keys.data
        found, scored = top_k_reranked(approx, queries, keys, k, self.rerank)
        self._charge(bytes_read=self.n * self._code_bytes() + scored * self._dim * keys.element_size(),
                     keys_scored=scored)
        return found

    def _code_bytes(self) -> float:
        return self.tables * self.bits / 8

    def _index_bytes(self) -> int:
        codes = self._lead.numel() * self._codes.n * self._code_bytes()
        return math.ceil(codes) + self._planes.numel() * PLANE_BYTES
