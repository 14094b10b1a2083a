"""FAISS HNSW graph over the keys (IndexHNSWFlat, inner product): ``hnsw``.

Each key is a node linked to ``M`` neighbours per upper level and ``2*M`` at level 0, found while inserting with a
candidate list of ``efConstruction``; a query walks the graph greedily from the top level and keeps a candidate list
of ``efSearch`` at level 0. FAISS returns at most efSearch results, so a search uses ``max(efSearch, k)``: asking for
k = 256 with efSearch = 16 searches with 256. ``add`` inserts decoded keys into the graph. Node levels are drawn from
a generator seeded with ``seed``; FAISS inserts in parallel (OpenMP), so the graph can still vary slightly between
runs with more than one thread. The graph is built from keys and walked with queries, which are distributed
differently (REFERENCE.md §3); the study measures what that costs. FAISS has no GPU HNSW: the index stays on the CPU.

Cost per query from FAISS's search statistics (``hnsw_stats``): keys_scored = distance computations (ndis, each a
full-precision q.k); bytes_read = ndis * d*4 (the vectors) + hops * 2M*4 (the level-0 link list of every expanded
node; upper-level lists have M links, so this slightly over-counts). index_bytes: FAISS's copy of the keys + links
(4 bytes each) + per-node level and offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from topklab.indexers._faiss import FLOAT_BYTES, FaissIndexer, require_positive
from topklab.indexers.registry import register

LINK_BYTES = LEVEL_BYTES = 4  # FAISS stores neighbour ids and node levels as int32, offsets as size_t
OFFSET_BYTES = 8


@register
@dataclass
class HNSW(FaissIndexer):
    M: int = 16
    efSearch: int = 32
    efConstruction: int = 40
    seed: int = 0

    name = "hnsw"
    examples = ("hnsw:M=8,efSearch=16", "hnsw:M=16,efSearch=64", "hnsw:M=32,efSearch=256")
    gpu_capable = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "M", "efSearch", "efConstruction")

    def _new_index(self, train: np.ndarray):
        index = self._faiss.IndexHNSWFlat(train.shape[1], self.M, self._faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.efConstruction
        index.hnsw.rng = self._faiss.RandomGenerator(self.seed)
        return index

    def _search_slice(self, s: int, q: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
        stats = self._faiss.cvar.hnsw_stats
        stats.reset()
        params = self._faiss.SearchParametersHNSW(efSearch=max(self.efSearch, k))
        _, labels = self._indexes[s].search(q, k, params=params)
        nbytes = stats.ndis * self._dim * FLOAT_BYTES + stats.nhops * 2 * self.M * LINK_BYTES
        return labels, float(nbytes), float(stats.ndis)

    def _index_bytes(self) -> int:
        total = 0
        for index in self._indexes:
            graph = index.hnsw
            total += index.ntotal * self._dim * FLOAT_BYTES + graph.neighbors.size() * LINK_BYTES
            total += graph.levels.size() * LEVEL_BYTES + graph.offsets.size() * OFFSET_BYTES
        return total
