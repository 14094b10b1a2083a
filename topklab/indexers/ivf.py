"""FAISS inverted-file indexes over the keys: ``ivf`` (IndexIVFFlat) and ``ivfpq`` (IndexIVFPQ).

Seeded k-means (``niter`` iterations, inner product) splits one slice's build keys into ``nlist`` lists; a query
scores every centroid and scans the ``nprobe`` lists whose centroids score highest. ``ivf`` scores the scanned keys
exactly; ``ivfpq`` stores each key as ``m`` codes of ``nbits`` (product quantisation of its residual to the centroid)
and scores them with lookup tables, so it scores no key at full precision.

The index is trained on the prompt's keys; ``add`` appends decoded keys to the list of their best centroid without
retraining. An ``nlist`` above the number of build keys (or ``2**nbits`` above it, for the PQ codebooks) cannot be
trained, so it is clamped to what the build keys allow, with a logged warning: a default spec still runs on a short
prompt, and the values used are in ``nlist_used`` / ``nbits_used``. Keys build the index and queries probe it, and
the two are distributed differently (REFERENCE.md §3): that mismatch is part of what the study measures.

Cost per query is counted from the index structure (our own list sizes and coarse assignment, so CPU and GPU count
alike; on CPU it equals FAISS's ``indexIVF_stats.ndis``): bytes_read = all centroids (nlist*d*4) + the scanned lists'
codes (d*4 per key for ``ivf``; ``code_size`` per key plus the PQ codebooks, 2**nbits*d*4, for ``ivfpq``);
keys_scored = keys scanned (``ivf``) or 0 (``ivfpq``); centroid scores count as bytes, not as keys. index_bytes:
centroids + codes + FAISS's 8-byte id per key (+ codebooks), since FAISS holds its own copy of the keys.

When the probed lists hold fewer than k keys, the remaining slots are -1 ("no key").
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from topklab.indexers._faiss import FLOAT_BYTES, ID_BYTES, FaissIndexer, require_positive
from topklab.indexers.registry import register

log = logging.getLogger(__name__)


@register
@dataclass
class IVF(FaissIndexer):
    nlist: int = 64
    nprobe: int = 8
    niter: int = 10
    seed: int = 0

    name = "ivf"
    examples = ("ivf:nlist=64,nprobe=2", "ivf:nlist=64,nprobe=8", "ivf:nlist=64,nprobe=32")
    #: Whether the scanned keys are scored at full precision (IVFPQ scores codes).
    scores_exactly: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "nlist", "nprobe", "niter")

    def _build(self, keys: torch.Tensor) -> None:
        self.nlist_used = self._clamped("nlist", self.nlist, keys.shape[-2], keys.shape[-2])
        self._quantizers: list = []
        self._list_sizes: list[np.ndarray] = []
        super()._build(keys)

    def _clamped(self, field: str, wanted: int, allowed: int, n_keys: int) -> int:
        """``wanted``, or ``allowed`` (with a warning) when ``n_keys`` build keys cannot train ``wanted``."""
        if wanted <= allowed:
            return wanted
        log.warning("%s: %s=%d is too large to train on %d build keys; using %s=%d",
                    self.spec, field, wanted, n_keys, field, allowed)
        return allowed

    def _new_index(self, train: np.ndarray):
        quantizer = self._faiss.IndexFlatIP(train.shape[1])
        index = self._ivf(quantizer, train.shape[1])
        # A prompt has a few thousand keys: train on all of them, without FAISS's "too few points" warning.
        index.cp.seed, index.cp.niter, index.cp.min_points_per_centroid = self.seed, self.niter, 1
        index.train(train)
        self._quantizers.append(quantizer)
        self._list_sizes.append(np.zeros(self.nlist_used, dtype=np.int64))
        return index

    def _ivf(self, quantizer, d: int):
        return self._faiss.IndexIVFFlat(quantizer, d, self.nlist_used, self._faiss.METRIC_INNER_PRODUCT)

    def _add_slice(self, s: int, x: np.ndarray) -> None:
        self._list_sizes[s] += np.bincount(self._quantizers[s].assign(x, 1).ravel(), minlength=self.nlist_used)
        super()._add_slice(s, x)

    def _search_slice(self, s: int, q: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
        nprobe = min(self.nprobe, self.nlist_used)
        probed = self._quantizers[s].assign(q, nprobe)
        scanned = float(self._list_sizes[s][probed].sum())
        _, labels = self._indexes[s].search(q, k, params=self._faiss.SearchParametersIVF(nprobe=nprobe))
        nbytes = len(q) * self._probe_bytes() + scanned * self._code_bytes()
        return labels, nbytes, scanned if self.scores_exactly else 0.0

    def _probe_bytes(self) -> int:
        """What every query reads before scanning lists: the centroids."""
        return self.nlist_used * self._dim * FLOAT_BYTES

    def _code_bytes(self) -> int:
        """Bytes stored per key in a list."""
        return self._dim * FLOAT_BYTES

    def _index_bytes(self) -> int:
        keys_held = sum(int(sizes.sum()) for sizes in self._list_sizes)
        return len(self._indexes) * self._probe_bytes() + keys_held * (self._code_bytes() + ID_BYTES)


@register
@dataclass
class IVFPQ(IVF):
    m: int = 8
    nbits: int = 8

    name = "ivfpq"
    examples = ("ivfpq:nlist=64,nprobe=4,m=8", "ivfpq:nlist=64,nprobe=16,m=16", "ivfpq:nlist=64,nprobe=32,m=32")
    scores_exactly = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "m")
        if not 1 <= self.nbits <= 16:
            raise ValueError(f"ivfpq: nbits must be in [1, 16] (bits per PQ code), got nbits={self.nbits}")

    def _build(self, keys: torch.Tensor) -> None:
        if keys.shape[-1] % self.m:
            raise ValueError(f"ivfpq: m={self.m} must divide the key dim d={keys.shape[-1]} (each of the m "
                             f"sub-quantizers codes d/m dims); choose m among the divisors of {keys.shape[-1]}")
        n_keys = keys.shape[-2]
        if n_keys < 2:
            raise ValueError("ivfpq: training PQ codebooks needs at least 2 build keys, got 1; build on more keys")
        self.nbits_used = self._clamped("nbits", self.nbits, int(math.log2(n_keys)), n_keys)
        super()._build(keys)

    def _ivf(self, quantizer, d: int):
        index = self._faiss.IndexIVFPQ(quantizer, d, self.nlist_used, self.m, self.nbits_used,
                                       self._faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed, index.pq.cp.niter, index.pq.cp.min_points_per_centroid = self.seed, self.niter, 1
        index.do_polysemous_training = False  # only polysemous (Hamming) search uses it, and it is slow to train
        return index

    def _probe_bytes(self) -> int:
        """Centroids plus the PQ codebooks (2**nbits centroids of d/m dims for each of the m sub-quantizers)."""
        return super()._probe_bytes() + (1 << self.nbits_used) * self._dim * FLOAT_BYTES

    def _code_bytes(self) -> int:
        return math.ceil(self.m * self.nbits_used / 8)
