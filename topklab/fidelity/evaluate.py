"""Score an indexer against the exact Top-k on captured traces, replaying decoding step by step.

For each layer the indexer is built on the prompt's keys; then, for every decode position t, the key of t is
``add``-ed (as a decoder would) and the query of t searches the t+1 visible keys. Each result row is one
(trace, layer, sequence, query head, position, k) measurement: recall@k, attention-mass recall, KL and output
error against dense attention, plus the indexer's cost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from topklab.fidelity.metrics import fidelity_from_logits
from topklab.fidelity.traces import LayerTrace, TraceFile
from topklab.indexers import Indexer, make

log = logging.getLogger(__name__)

METRICS = ("recall", "mass_recall", "kl", "output_error")
COSTS = ("bytes_read", "keys_scored", "index_bytes", "build_s", "search_us")


def evaluate_layer(indexer: Indexer, trace: LayerTrace, ks: Sequence[int], device="cpu") -> pd.DataFrame:
    """Replay the decode positions of one layer's trace through ``indexer``; one row per head x position x k."""
    if trace.prompt_len >= trace.length:
        raise ValueError(
            f"layer {trace.layer}: the trace has no decode positions (prompt_len = length = {trace.length}); "
            "capture it with prompt_len < length"
        )
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] <= 0:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if ks[-1] > trace.prompt_len + 1:
        raise ValueError(f"k = {ks[-1]} exceeds the {trace.prompt_len + 1} keys visible at the first decode position")
    q, k, v = (x.to(device, torch.float32) for x in (trace.q, trace.k, trace.v))
    batch, kv_heads, group = k.shape[0], k.shape[1], trace.group_size
    uses_hidden = indexer.source == "hidden"
    if uses_hidden and trace.hidden is None:
        raise ValueError(f"{indexer.spec} needs attention-input hidden states, which this trace does not hold")
    stream = trace.hidden.to(device, torch.float32) if uses_hidden else k
    indexer.build(stream[..., : trace.prompt_len, :])
    build_s, columns = indexer.cost.build_seconds, {name: [] for name in ("position", "k", *METRICS, *COSTS)}
    for t in range(trace.prompt_len, trace.length):
        indexer.add(stream[..., t : t + 1, :])
        query = q[:, :, t].reshape(batch, kv_heads, group, -1)
        logits = torch.matmul(query, k[:, :, : t + 1].transpose(-1, -2)) * trace.scale
        truth = torch.topk(logits, ks[-1], dim=-1).indices
        for kk in ks:
            pred = indexer.search(stream[..., t : t + 1, :] if uses_hidden else query, kk)
            if uses_hidden:  # one selection per token, shared by every head of the layer
                pred = pred.reshape(batch, 1, 1, kk).expand(batch, kv_heads, group, kk)
            scores = fidelity_from_logits(logits, v[:, :, : t + 1], pred, truth[..., :kk])
            n = batch * kv_heads * group
            for name in METRICS:
                columns[name].append(scores[name].reshape(-1).cpu().numpy())
            cost = indexer.cost
            for name, value in (("position", t), ("k", kk), ("bytes_read", cost.bytes_read),
                                ("keys_scored", cost.keys_scored), ("index_bytes", cost.index_bytes),
                                ("build_s", build_s), ("search_us", cost.search_seconds * 1e6)):
                columns[name].append(np.full(n, value))
    frame = pd.DataFrame({name: np.concatenate(parts) for name, parts in columns.items()})
    steps = len(frame) // (batch * kv_heads * group)
    frame.insert(0, "seq", np.tile(np.repeat(np.arange(batch), kv_heads * group), steps))
    frame.insert(1, "head", np.tile(np.arange(kv_heads * group), batch * steps))
    frame.insert(2, "kv_head", frame["head"] // group)
    frame.insert(3, "layer", trace.layer)
    frame["context"] = frame["position"] + 1
    return frame


def evaluate_spec(spec: str, traces: Sequence[TraceFile], ks: Sequence[int], layers: Iterable[int] | None = None,
                  fit_traces: Sequence[TraceFile] = (), device="cpu") -> pd.DataFrame:
    """One indexer spec over several traces and layers; trainable indexers are fitted per layer on ``fit_traces``."""
    indexer = make(spec)
    if indexer.trainable and not fit_traces:
        raise ValueError(f"{spec} is trainable: give traces to fit it on (held out from the evaluated ones)")
    layers = list(layers) if layers is not None else traces[0].layers
    frames = []
    for layer in layers:
        if indexer.trainable:
            indexer = make(spec).fit([ft.layer(layer) for ft in fit_traces])
        for trace in traces:
            frame = evaluate_layer(indexer, trace.layer(layer), ks, device)
            frame.insert(0, "trace", trace.path.stem)
            frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out.insert(1, "indexer", indexer.spec if not indexer.trainable else spec)
    out.insert(2, "family", indexer.name)
    return out
