"""Attention traces: one layer's queries, keys, values and attention-input hidden states, captured from a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerTrace:
    """One layer's captured attention for a batch of sequences (post-RoPE, GQA layout as the model stores it).

    q ``[B, Hq, T, d]``, k and v ``[B, Hkv, T, d]`` (query head h reads KV head h // (Hq // Hkv)), hidden ``[B, T, D]``
    (the input of the attention block, after its norm: what a learned indexer projects), ``scale`` the softmax
    scale, ``prompt_len`` the number of leading positions that were prefill (later ones are decode positions).
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    hidden: torch.Tensor | None
    scale: float
    prompt_len: int

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[2]
