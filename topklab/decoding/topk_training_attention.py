"""Top-k attention in the training forward pass: every query position attends to its k best causal keys.

    with topk_training_attention(model, k=0.02):
        loss = model(input_ids, labels=labels).loss
        loss.backward()

This is the study's native Top-k training (Top-k SFT): selection is exact, per query position and causal, made on
detached scores (an argmax has no gradient), and the softmax is renormalised over the selected keys, so gradients
reach q, k and v through the selected keys only; a key outside a query's Top-k gets no gradient from that query.
The math is `masked_topk_attention` (the same function sparse prefill uses), so training and Top-k decoding select
alike. It materialises the [B, Hq, T, N] scores like eager attention: meant for small models and contexts of a few
thousand tokens.

``dense_prefix = P`` keeps the first P query positions dense: with P = the prompt length, one forward pass over
prompt + reference answer gives what Top-k decoding (dense prefill, Top-k at every answer step) computes for that
answer, teacher-forced: a cheap way to score Top-k decoding by the answer's likelihood.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from topklab.decoding.hf import attention_hook, attention_modules, dense_attention
from topklab.decoding.topk_attention import PER_CHOICES, check_count, check_k, masked_topk_attention


@dataclass
class TopkSpec:
    """Top-k attention options for training (as in `TopkAttention`): the training config's ``topk`` and the base of
    the hook below."""

    k: int | float
    per: str = "head"
    sinks: int = 0
    window: int = 0
    dense_layers: Sequence[int] = ()

    def __post_init__(self):
        check_k(self.k)
        if self.per not in PER_CHOICES:
            raise ValueError(f"per must be one of {', '.join(PER_CHOICES)}, got {self.per!r}")
        for name in ("sinks", "window"):
            check_count(name, getattr(self, name))
        self.dense_layers = tuple(int(i) for i in self.dense_layers)


@dataclass
class TopkTrainingAttention(TopkSpec):
    """The attention function transformers calls while training with Top-k; ``dense_prefix`` query positions dense
    (see the module docstring)."""

    dense_prefix: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_count("dense_prefix", self.dense_prefix)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx in self.dense_layers or getattr(module, "sliding_window", None):
            # sliding-window layers stay dense, as in `TopkAttention`: training must attend as decoding does
            return dense_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if kwargs.get("softcap") is not None:
            raise ValueError("Top-k training attention does not support attention logit soft-capping (softcap)")
        if dropout:
            raise ValueError(f"Top-k training attention has no attention dropout; set the model's attention_dropout "
                             f"to 0 (got {dropout})")
        valid = visible_keys(attention_mask, query.shape[0], query.shape[2], key.shape[2], query.device)
        options = dict(per=self.per, sinks=self.sinks, window=self.window, scale=scaling)
        first = min(self.dense_prefix - (key.shape[2] - query.shape[2]), query.shape[2])  # dense query rows here
        if first <= 0:
            return masked_topk_attention(query, key, value, valid, k=self.k, **options), None
        dense = masked_topk_attention(query[:, :, :first], key, value, valid[:, :first], k=1.0, **options)
        sparse = masked_topk_attention(query[:, :, first:], key, value, valid[:, first:], k=self.k, **options)
        return torch.cat([dense, sparse], dim=1), None


def visible_keys(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """``[B, q_len, kv_len]`` bool: the keys each query may see, from transformers' SDPA mask.

    The mask is ``[B or 1, 1, q_len, kv_len]`` (bool, or additive float) with causality and padding folded in, or
    None where transformers skipped it for a plain causal batch; then the query at row i sees keys up to
    ``kv_len - q_len + i``.
    """
    if attention_mask is None:
        positions = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        return (torch.arange(kv_len, device=device) <= positions).expand(batch, q_len, kv_len)
    mask = attention_mask[:, 0, :, :kv_len]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(batch, q_len, kv_len)


@contextlib.contextmanager
def topk_training_attention(model: torch.nn.Module, k: int | float, *, per: str = "head", sinks: int = 0,
                            window: int = 0, dense_layers: Sequence[int] = (),
                            dense_prefix: int = 0) -> Iterator[TopkTrainingAttention]:
    """Within the context every forward pass of ``model`` (training or not) uses causal Top-k attention (the first
    ``dense_prefix`` positions dense)."""
    hook = TopkTrainingAttention(k, per=per, sinks=sinks, window=window, dense_layers=dense_layers,
                                 dense_prefix=dense_prefix)
    unknown = sorted(set(hook.dense_layers) - set(attention_modules(model)))
    if unknown:
        raise ValueError(f"dense_layers names layer(s) {unknown} that {type(model).__name__} does not have")
    with attention_hook(model, hook):
        yield hook


__all__ = ["TopkSpec", "TopkTrainingAttention", "topk_training_attention", "visible_keys"]
