"""Shared FAISS plumbing for the key-built ANN indexers (``ivf``, ``ivfpq``, ``hnsw``).

FAISS indexes one matrix, so keys ``[*, N, d]`` become one FAISS index per leading (batch x head) slice, each built
on that slice's keys with the inner-product metric (attention ranks keys by q.k, not by L2 distance). Vectors go to
FAISS as contiguous float32 numpy arrays; labels come back as an int64 tensor on the queries' device, best first.
FAISS marks the slots it could not fill (e.g. an IVF probe that reached fewer than k keys) with -1; they are kept,
since the fidelity metrics read -1 as "no key", so a cheap setting pays for its misses in recall.

FAISS is imported on first build, so the package imports without it. A GPU index (``faiss.StandardGpuResources``)
is used when FAISS was built with GPU support, a GPU is visible and the keys are on CUDA; otherwise the index lives
on the CPU and only the results move to the keys' device. No FAISS GPU build runs in this workplace
(REFERENCE.md §4), so the GPU path is untested here.
"""

from __future__ import annotations

import contextlib
import logging
from typing import ClassVar

import numpy as np
import torch

from topklab.indexers.base import Indexer

log = logging.getLogger(__name__)

FLOAT_BYTES = 4
ID_BYTES = 8  # FAISS stores an int64 id beside every vector of an inverted list
FAISS_SEED_MAX = 2**31 - 1


def import_faiss():
    """The faiss module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "the ivf, ivfpq and hnsw indexers need FAISS, which is not installed: pip install faiss-cpu "
            "(or pip install 'topklab[faiss]')"
        ) from err
    return faiss


def require_positive(indexer: Indexer, *fields: str) -> None:
    """Integer spec parameters that count something (lists, probes, links, iterations) must be >= 1."""
    for field in fields:
        value = getattr(indexer, field)
        if value < 1:
            raise ValueError(f"{indexer.name}: {field} must be >= 1, got {field}={value}")


def as_numpy_slices(t: torch.Tensor) -> np.ndarray:
    """``[*, n, d]`` -> contiguous float32 numpy ``[S, n, d]``, S = the number of leading (batch x head) slices."""
    flat = t.detach().to("cpu", torch.float32).reshape(-1, t.shape[-2], t.shape[-1])
    return np.ascontiguousarray(flat.numpy())


class FaissIndexer(Indexer):
    """One FAISS index per leading slice. Subclasses create the trained, empty index and search one slice.

    Hooks: ``_new_index(train)`` returns a trained, empty CPU index for one slice's build keys; ``_search_slice``
    returns (labels ``[M, k]``, bytes read, keys scored) summed over that slice's M queries; ``_index_bytes``
    the memory all slices hold.
    """

    #: FAISS has GPU versions of its IVF indexes but not of IndexHNSWFlat.
    gpu_capable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.seed <= FAISS_SEED_MAX:  # FAISS takes its seeds as a C int
            raise ValueError(f"{self.name}: seed must be in [0, {FAISS_SEED_MAX}], got seed={self.seed}")

    def _build(self, keys: torch.Tensor) -> None:
        self._faiss = import_faiss()
        self._gpu = self._gpu_resources(keys.device) if self.gpu_capable else None
        with self._one_thread():
            self._indexes = [self._to_device(self._new_index(train)) for train in as_numpy_slices(keys)]
        self._add(keys)

    def _add(self, keys: torch.Tensor) -> None:
        with self._one_thread():
            for s, x in enumerate(as_numpy_slices(keys)):
                self._add_slice(s, x)
        self.cost.index_bytes = self._index_bytes()

    def _add_slice(self, s: int, x: np.ndarray) -> None:
        self._indexes[s].add(x)

    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        labels, bytes_read, keys_scored = [], 0.0, 0.0
        with self._one_thread():
            for s, q in enumerate(as_numpy_slices(queries)):
                found, nbytes, scored = self._search_slice(s, q, k)
                labels.append(found)
                bytes_read += nbytes
                keys_scored += scored
        n_queries = max(1, queries[..., 0].numel())
        self._charge(bytes_read=bytes_read / n_queries, keys_scored=keys_scored / n_queries)
        out = torch.from_numpy(np.stack(labels).astype(np.int64, copy=False))
        return out.reshape(*queries.shape[:-1], k).to(queries.device)

    @contextlib.contextmanager
    def _one_thread(self):
        """Run FAISS on one OpenMP thread: an index holds one slice's few thousand keys and a search a few queries,
        too little to share out, and on a busy machine FAISS's spinning threads made a layer's replay 10-30x slower
        (ivf 0.5 s -> 13 s, ivfpq 1.3 s -> 41 s, 2-core box under load). It also makes k-means and HNSW insertion
        deterministic."""
        before = self._faiss.omp_get_max_threads()
        self._faiss.omp_set_num_threads(1)
        try:
            yield
        finally:
            self._faiss.omp_set_num_threads(before)

    def _gpu_resources(self, device: torch.device):
        if device.type != "cuda":
            return None
        if not hasattr(self._faiss, "StandardGpuResources") or self._faiss.get_num_gpus() == 0:
            log.info("%s: keys are on %s but this FAISS has no GPU support; the index runs on the CPU",
                     self.spec, device)
            return None
        return self._faiss.StandardGpuResources()

    def _to_device(self, index):
        if self._gpu is None:
            return index
        return self._faiss.index_cpu_to_gpu(self._gpu, self._device.index or 0, index)

    # -- hooks -----------------------------------------------------------------------------------------------
    def _new_index(self, train: np.ndarray):
        raise NotImplementedError

    def _search_slice(self, s: int, q: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
        raise NotImplementedError

    def _index_bytes(self) -> int:
        raise NotImplementedError


__all__ = ["FLOAT_BYTES", "ID_BYTES", "FaissIndexer", "as_numpy_slices", "import_faiss", "require_positive"]
