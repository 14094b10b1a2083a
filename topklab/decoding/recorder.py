"""Online fidelity: how the chosen indexer's selection compares with the exact Top-k at every decode step.

One row per (decode step, layer, query head, sequence). ``recall`` is recall@k of the indexer's k picks against
the exact Top-k picked in the same way (same ``per``, same k); ``mass_recall`` is the share of the head's dense
attention mass on the keys it actually attended to (the picks plus sinks and window); ``exact_mass_recall`` the
same for the exact Top-k (plus sinks and window), the ceiling an indexer can reach; ``output_error`` the relative
L2 error of the head's attention output against dense attention.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from topklab.fidelity.metrics import attention_logits, fidelity_from_logits, recall_at_k

COLUMNS = (
    "step", "layer", "head", "kv_head", "seq", "indexer", "per", "k", "context",
    "recall", "mass_recall", "exact_mass_recall", "output_error",
)


class FidelityRecorder:
    """Collects fidelity rows while a model decodes under `topk_attention(..., record=True)`."""

    def __init__(self) -> None:
        self._chunks: list[dict[str, np.ndarray]] = []

    def record(self, *, step: int, layer: int, seqs: list[int], indexer: str, per: str, k: int, q: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, picked: torch.Tensor, attended: torch.Tensor,
               exact: torch.Tensor, exact_attended: torch.Tensor, scale: float) -> None:
        """One decode step of one layer for the sequences ``seqs``.

        q ``[b, Hkv, G, d]``; keys/values ``[b, Hkv, n, d]`` (the valid keys of each sequence); index tensors
        ``[b, Hkv, G, *]`` into those n keys: ``picked``/``exact`` the k keys of the indexer and of exact Top-k,
        ``attended``/``exact_attended`` the same plus sinks and window (-1 = empty slot).
        """
        logits = attention_logits(q, keys, scale)
        ours = fidelity_from_logits(logits, values, attended, true=None)
        ceiling = fidelity_from_logits(logits, values, exact_attended, true=None)["mass_recall"]
        b, hkv, g = q.shape[:3]
        heads = np.arange(hkv * g)
        columns = {
            "recall": recall_at_k(picked, exact),
            "mass_recall": ours["mass_recall"],
            "exact_mass_recall": ceiling,
            "output_error": ours["output_error"],
        }
        chunk = {name: value.reshape(-1).cpu().numpy() for name, value in columns.items()}
        rows = b * hkv * g
        chunk.update(
            step=np.full(rows, step), layer=np.full(rows, layer), head=np.tile(heads, b),
            kv_head=np.tile(heads // g, b), seq=np.repeat(np.asarray(seqs), hkv * g),
            indexer=np.full(rows, indexer, dtype=object), per=np.full(rows, per, dtype=object),
            k=np.full(rows, k), context=np.full(rows, keys.shape[-2]),
        )
        self._chunks.append(chunk)

    def frame(self) -> pd.DataFrame:
        """All rows recorded so far, as a tidy DataFrame with the columns in `COLUMNS`."""
        if not self._chunks:
            return pd.DataFrame({name: [] for name in COLUMNS})
        merged = {name: np.concatenate([chunk[name] for chunk in self._chunks]) for name in COLUMNS}
        return pd.DataFrame(merged).sort_values(["seq", "step", "layer", "head"], kind="stable", ignore_index=True)

    def clear(self) -> None:
        self._chunks.clear()
