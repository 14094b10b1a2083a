"""Score an indexer against the exact Top-k on captured traces, replaying decoding step by step.

For each layer the indexer is built on the prompt's keys; then, for every decode position t, the key of t is
``add``-ed (as a decoder would) and the query of t searches the t+1 visible keys. Each result row is one
(trace, layer, sequence, query head, position, k) measurement: recall@k, attention-mass recall, KL and output
error against dense attention, plus the indexer's cost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from topklab.fidelity.metrics import fidelity_from_logits
from topklab.fidelity.traces import LayerTrace, TraceFile
from topklab.indexers import Indexer, make
from topklab.runtime import single_thread

log = logging.getLogger(__name__)

METRICS = ("recall", "mass_recall", "kl", "output_error")
COSTS = ("bytes_read", "keys_scored", "index_bytes", "build_s", "search_us")


def evaluate_layer(indexer: Indexer, trace: LayerTrace, ks: Sequence[int], device="cpu") -> pd.DataFrame:
    """Replay the decode positions of one layer's trace through ``indexer``; one row per head x position x k.

    The indexer runs step by step (add the position's key, then search); the metrics are computed afterwards for
    all positions at once, against causal dense attention over the keys each position could see.
    """
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
    start, length = trace.prompt_len, trace.length
    steps = length - start
    uses_hidden = indexer.source == "hidden"
    if uses_hidden and trace.hidden is None:
        raise ValueError(f"{indexer.spec} needs attention-input hidden states, which this trace does not hold")
    stream = trace.hidden.to(device, torch.float32) if uses_hidden else k
    # queries of the decode positions, a KV head's query heads folded together: [B, Hkv, G, steps, d]
    queries = q[:, :, start:].reshape(batch, kv_heads, group, steps, -1)

    indexer.build(stream[..., :start, :])
    build_s = indexer.cost.build_seconds
    preds = {kk: [] for kk in ks}
    costs = {name: np.empty((steps, len(ks))) for name in ("bytes_read", "keys_scored", "index_bytes", "search_us")}
    for step in range(steps):
        t = start + step
        indexer.add(stream[..., t : t + 1, :])
        searcher = stream[..., t : t + 1, :] if uses_hidden else queries[:, :, :, step].reshape(batch, kv_heads, group, -1)
        for j, kk in enumerate(ks):
            pred = indexer.search(searcher, kk)
            if uses_hidden:  # one selection per token, shared by every head of the layer
                pred = pred.reshape(batch, 1, 1, kk).expand(batch, kv_heads, group, kk)
            preds[kk].append(pred)
            cost = indexer.cost
            costs["bytes_read"][step, j], costs["keys_scored"][step, j] = cost.bytes_read, cost.keys_scored
            costs["index_bytes"][step, j], costs["search_us"][step, j] = cost.index_bytes, cost.search_seconds * 1e6

    causal = torch.arange(length, device=device)[None, :] > torch.arange(start, length, device=device)[:, None]
    logits = (torch.matmul(queries, k[:, :, None].transpose(-1, -2)) * trace.scale).masked_fill(causal, -math.inf)
    truth = torch.topk(logits, ks[-1], dim=-1).indices
    frames = []
    for j, kk in enumerate(ks):
        pred = torch.stack(preds[kk], dim=-2)  # [B, Hkv, G, steps, k]
        scores = fidelity_from_logits(logits, v[:, :, None], pred, truth[..., :kk])
        shape = scores["recall"].shape  # [B, Hkv, G, steps]
        index = np.indices(shape).reshape(len(shape), -1)
        frame = pd.DataFrame({
            "seq": index[0], "head": index[1] * group + index[2], "kv_head": index[1], "layer": trace.layer,
            "position": start + index[3], "k": kk,
            **{name: scores[name].reshape(-1).cpu().numpy() for name in METRICS},
            **{name: values[index[3], j] for name, values in costs.items()},
            "build_s": build_s,
        })
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out["context"] = out["position"] + 1
    return out


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
            with single_thread():
                indexer = make(spec).fit([ft.layer(layer) for ft in fit_traces])
        for trace in traces:
            with single_thread():
                frame = evaluate_layer(indexer, trace.layer(layer), ks, device)
            frame.insert(0, "trace", trace.path.stem)
            frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out.insert(1, "indexer", indexer.spec if not indexer.trainable else spec)
    out.insert(2, "family", indexer.name)
    return out

