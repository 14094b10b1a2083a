"""Distil a hidden-state indexer from a layer's dense attention: DeepSeek DSA's dense warm-up stage.

The model stays frozen; only the indexer learns. For a query position t the target is the layer's causal dense
attention summed over query heads and L1-normalised,

    p[t, s] = (1 / Hq) * sum_h softmax_s(scale * q[h, t] . k[h // G, s]),   s <= t,

and the loss is KL(p || softmax(I[t, :t+1])) with I the indexer's scores. Each step draws one sequence and a random
subset of query positions (seeded), so a step costs O(rows * T) however long the trace is.

A scorer is any ``torch.nn.Module`` called as ``scorer(hidden [1, T, D], rows [R]) -> logits [1, R, T]`` in full
precision (keys at every position, queries at ``rows``); the causal mask is applied here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from topklab.fidelity.traces import LayerTrace

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    """One sequence of a trace: hidden [T, D], q [Hq, T, d], k [Hkv, T, d]."""

    hidden: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    scale: float


def attention_target(q: torch.Tensor, k: torch.Tensor, scale: float, rows: torch.Tensor) -> torch.Tensor:
    """Causal dense attention of query positions ``rows`` summed over query heads, L1-normalised: ``[R, T]``.

    q ``[Hq, T, d]``, k ``[Hkv, T, d]`` (query head h reads KV head h // (Hq // Hkv)); fp32 throughout.
    """
    hq, hkv = q.shape[0], k.shape[0]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    queries = q[:, rows].float().reshape(hkv, hq // hkv * len(rows), -1)
    logits = torch.matmul(queries, k.float().transpose(-1, -2)) * scale  # [Hkv, G*R, T]
    logits = logits.reshape(hq, len(rows), -1).masked_fill(_future(rows, k.shape[1]), float("-inf"))
    return torch.softmax(logits, dim=-1).mean(0)


def distillation_kl(logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target || softmax(logits)), both restricted to the causal keys s <= row."""
    future = _future(rows, logits.shape[-1])
    log_q = torch.log_softmax(logits.masked_fill(future, float("-inf")), dim=-1).masked_fill(future, 0.0)
    terms = torch.special.xlogy(target, target) - target * log_q
    return terms.sum(-1).mean()


def distill(scorer: torch.nn.Module, layers: Sequence[LayerTrace], steps: int, lr: float, seed: int,
            rows: int = 128) -> list[float]:
    """Train ``scorer`` with Adam for ``steps`` steps of ``rows`` query positions each; returns the loss per step."""
    sequences = _sequences(layers)
    device = next(scorer.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(scorer.parameters(), lr=lr)
    losses: list[float] = []
    scorer.train()
    bar = tqdm(range(steps), desc=f"distill indexer (layer {layers[0].layer})", leave=False)
    for step in bar:
        seq = sequences[int(torch.randint(len(sequences), (1,), generator=generator))]
        length = seq.hidden.shape[0]
        picked = torch.randperm(length, generator=generator)[: min(rows, length)].to(device)
        with torch.no_grad():
            target = attention_target(seq.q.to(device), seq.k.to(device), seq.scale, picked)
        loss = distillation_kl(scorer(seq.hidden.to(device).float()[None], picked)[0], target, picked)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.3f}", refresh=False)
        if step % 50 == 0 or step == steps - 1:
            log.info("distill layer %d step %d/%d: KL %.4f", layers[0].layer, step + 1, steps, losses[-1])
    scorer.eval()
    return losses


@torch.no_grad()
def evaluate_kl(scorer: torch.nn.Module, layers: Sequence[LayerTrace], rows: torch.Tensor | None = None,
                chunk: int = 256) -> float:
    """Mean KL(p || softmax(I)) over the given query positions (all by default) of every sequence, ``chunk`` query
    positions at a time so memory stays O(chunk * T)."""
    device = next(scorer.parameters()).device
    total, count = 0.0, 0
    for seq in _sequences(layers):
        hidden, q, k = seq.hidden.to(device).float()[None], seq.q.to(device), seq.k.to(device)
        for picked in (torch.arange(seq.hidden.shape[0]) if rows is None else rows).to(device).split(chunk):
            target = attention_target(q, k, seq.scale, picked)
            total += float(distillation_kl(scorer(hidden, picked)[0], target, picked)) * len(picked)
            count += len(picked)
    return total / count


def _future(rows: torch.Tensor, length: int) -> torch.Tensor:
    """``[R, T]`` mask of the keys after each query position (what causal attention cannot see)."""
    return torch.arange(length, device=rows.device)[None, :] > rows[:, None]


def _sequences(layers: Sequence[LayerTrace]) -> list[_Sequence]:
    """Split traces of one layer into sequences, with clear errors for traces a hidden-state indexer cannot use."""
    if not layers:
        raise ValueError("fit needs at least one LayerTrace")
    if len({lt.layer for lt in layers}) > 1:
        raise ValueError(f"fit learns one layer at a time, got traces of layers {sorted({lt.layer for lt in layers})}")
    out = []
    for lt in layers:
        if lt.hidden is None:
            raise ValueError(f"the trace of layer {lt.layer} has no hidden states; capture traces with hidden states")
        if lt.hidden.shape[:2] != (lt.q.shape[0], lt.q.shape[2]):
            raise ValueError(f"hidden {tuple(lt.hidden.shape)} does not match q {tuple(lt.q.shape)}: need [B, T, D]")
        out.extend(_Sequence(lt.hidden[b], lt.q[b], lt.k[b], lt.scale) for b in range(lt.hidden.shape[0]))
    return out
