"""The indexer protocol: a tiny base class that owns validation, key storage, timing and cost accounting.

An indexer answers "which k of these N keys will this query attend to most?" without (necessarily) scoring all
N keys exactly. Subclasses are dataclasses whose fields are the spec parameters (``ivf:nlist=256,nprobe=16``) and
implement ``_build``, ``_add`` and ``_search``; everything else lives here.

Shapes: keys ``[*, N, d]``, queries ``[*, M, d]``, result ``[*, M, k]`` (int64 indices into N, best first where the
indexer ranks). The leading dims are batch x KV heads and must match; for GQA fold the G query heads of a KV head
into the query axis. Indexers with ``source = "hidden"`` (the learned Lightning indexer) take the attention-input
hidden states ``[B, N, D]`` instead and select one set per token shared by all heads of a layer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from topklab.checks import check_k, check_vectors

if TYPE_CHECKING:
    from topklab.fidelity.traces import LayerTrace


@dataclasses.dataclass
class Cost:
    """What an indexer spends, so recall can be set against cost.

    ``bytes_read`` and ``keys_scored`` are per query, averaged over the queries of the last ``search``:
    bytes of index data read (codes, centroids, graph links, full keys) and keys whose score was computed at full
    precision. ``index_bytes`` is the memory the index holds beyond the KV cache itself; ``build_seconds`` the
    wall time of ``build``; ``search_seconds`` the wall time of the last ``search`` divided by its queries.
    """

    bytes_read: float = 0.0
    keys_scored: float = 0.0
    index_bytes: int = 0
    build_seconds: float = 0.0
    search_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


class KeyBuffer:
    """Keys ``[*, N, d]`` that grow along N with amortised O(1) appends (decoding adds one key per step)."""

    def __init__(self, keys: torch.Tensor):
        self._buf = keys.clone()
        self.n = keys.shape[-2]

    def append(self, keys: torch.Tensor) -> None:
        need = self.n + keys.shape[-2]
        if need > self._buf.shape[-2]:
            grown = self._buf.new_empty(*self._buf.shape[:-2], max(need, 2 * self._buf.shape[-2]), self._buf.shape[-1])
            grown[..., : self.n, :] = self._buf[..., : self.n, :]
            self._buf = grown
        self._buf[..., self.n : need, :] = keys
        self.n = need

    @property
    def data(self) -> torch.Tensor:
        return self._buf[..., : self.n, :]

    def nbytes(self) -> int:
        return self._buf.shape[:-2].numel() * self.n * self._buf.shape[-1] * self._buf.element_size()


class Indexer:
    """Base class. Subclasses: ``@register`` + ``@dataclass``, fields = spec parameters, and the three hooks."""

    name: ClassVar[str] = ""
    #: "qk" indexers search the model's keys with its queries; "hidden" ones use attention-input hidden states.
    source: ClassVar[str] = "qk"
    #: Allowed values of string parameters, checked when the spec is parsed.
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: Specs that `topklab recall` evaluates by default for this family.
    examples: ClassVar[tuple[str, ...]] = ()
    #: Learned indexers set this and implement ``fit``; `topklab recall` fits them on held-out traces first.
    trainable: ClassVar[bool] = False
    #: Search draws random numbers as it goes: decoding gives each sequence of a batch its own copy, so a sequence's
    #: picks do not depend on its batch-mates.
    stochastic: ClassVar[bool] = False
    #: The model layer a trainable indexer was fitted on (None: not fitted, or not tied to a layer); decoding refuses
    #: it at another layer.
    fitted_layer: int | None = None

    def __post_init__(self) -> None:
        for field, allowed in self.choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"{self.name}: {field}={getattr(self, field)!r} is not valid; choose one of {', '.join(allowed)}"
                )
        self._reset()

    def _reset(self) -> None:
        """Forget the indexed keys (learned parameters of trainable indexers are kept)."""
        self.n = 0
        self.cost = Cost()
        self._lead: torch.Size | None = None
        self._dim = 0
        self._device: torch.device | None = None

    # -- the spec string -------------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """Canonical spec: the name plus every parameter that differs from its default, in declaration order."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.init and value != f.default:
                parts.append(f"{f.name}={_format_value(value)}")
        return self.name + (":" + ",".join(parts) if parts else "")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec} n={self.n}>"

    @property
    def fitted(self) -> bool:
        """False only for a trainable indexer that has no learned parameters yet."""
        return not self.trainable

    def require_fitted(self) -> "Indexer":
        """Refuse, with what to do, an indexer that cannot build yet (before a model or a job spends any time)."""
        if not self.fitted:
            raise ValueError(f"{self.spec} is a learned indexer and is not trained: fit it per layer on captured "
                             "attention (Indexer.fit, as `topklab recall` does) and pass the fitted indexers, or "
                             "load one with ckpt=PATH")
        return self

    # -- the protocol ----------------------------------------------------------------------------------------
    def fit(self, layers: "Sequence[LayerTrace]") -> "Indexer":
        """Learn parameters from captured attention of one layer (several sequences); only trainable indexers."""
        raise TypeError(f"{self.spec} is not trainable: it has nothing to fit")

    def build(self, keys: torch.Tensor) -> "Indexer":
        """Index ``keys [*, N, d]`` (replacing whatever was indexed before)."""
        check_vectors(keys, "keys")
        if keys.shape[-2] == 0:
            raise ValueError("cannot build an index on an empty cache (N = 0); pass at least one key")
        self._reset()
        self._lead, self._dim, self._device = keys.shape[:-2], keys.shape[-1], keys.device
        start = time.perf_counter()
        self._build(keys)
        self.cost.build_seconds = time.perf_counter() - start
        self.n = keys.shape[-2]
        return self

    def add(self, keys: torch.Tensor) -> None:
        """Append keys ``[*, n_new, d]`` (decoding adds each step's key instead of rebuilding)."""
        if self._lead is None:
            raise RuntimeError(f"{self.spec}: call build(keys) before add()")
        check_vectors(keys, "keys")
        self._check_like_index(keys, "keys")
        if keys.shape[-2] == 0:
            return
        self._add(keys)
        self.n += keys.shape[-2]

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Indices ``[*, M, k]`` of the (approximately) highest-scoring keys for each query."""
        if self._lead is None:
            raise RuntimeError(f"{self.spec}: call build(keys) before search()")
        check_vectors(queries, "queries")
        self._check_like_index(queries, "queries")
        check_k(k, self.n)
        start = time.perf_counter()
        out = self._search(queries, k)
        n_queries = max(1, queries[..., 0].numel())
        self.cost.search_seconds = (time.perf_counter() - start) / n_queries
        expected = (*queries.shape[:-1], k)
        if tuple(out.shape) != expected:
            raise AssertionError(f"{self.spec} returned shape {tuple(out.shape)}, expected {expected}")
        return out

    def _check_like_index(self, t: torch.Tensor, name: str) -> None:
        if t.device != self._device:
            raise ValueError(f"{name} are on {t.device} but the index was built on {self._device}")
        if t.shape[:-2] != self._lead:
            raise ValueError(
                f"{name} have leading (batch x head) dims {tuple(t.shape[:-2])} but the index was built with "
                f"{tuple(self._lead)}; for GQA fold the query heads of a KV head into the query axis"
            )
        if t.shape[-1] != self._dim:
            raise ValueError(f"{name} have dim {t.shape[-1]} but the index was built with dim {self._dim}")

    def _charge(self, bytes_read: float, keys_scored: float) -> None:
        """Record the per-query cost of the current search."""
        self.cost.bytes_read = float(bytes_read)
        self.cost.keys_scored = float(keys_scored)

    # -- hooks for subclasses --------------------------------------------------------------------------------
    def _build(self, keys: torch.Tensor) -> None:
        raise NotImplementedError

    def _add(self, keys: torch.Tensor) -> None:
        raise NotImplementedError

    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError


class StoredKeysIndexer(Indexer):
    """An indexer that keeps (a reference copy of) the full-precision keys, e.g. to score or re-rank exactly."""

    def _build(self, keys: torch.Tensor) -> None:
        self.keys = KeyBuffer(keys)

    def _add(self, keys: torch.Tensor) -> None:
        self.keys.append(keys)


def exact_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q . k for every pair, in float32: ``[*, M, N]``."""
    return torch.matmul(queries.float(), keys.float().transpose(-1, -2))


def _format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):  # short, yet parsing the spec back gives this very value
        return f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return str(value)


__all__ = ["Cost", "Indexer", "KeyBuffer", "StoredKeysIndexer", "exact_scores"]
