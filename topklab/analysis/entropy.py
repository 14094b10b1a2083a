"""Attention entropy at decode positions, per layer and head (the study's claim 4), from captured traces.

Low-entropy attention puts its mass on few keys, which is what Top-k keeps; high-entropy attention spreads it, and
Top-k loses the tail. For each decode position t of a trace (a query that sees keys 0..t) this computes

- ``entropy``       H = -sum_i p_i log p_i in nats, from log-probabilities (log-sum-exp, masked keys add 0)
- ``norm_entropy``  H / log(context), 0 (focused on one key) .. 1 (uniform), comparable across context lengths
- ``mass_at_k_<k>`` the dense attention mass the exact Top-k keeps (1 - the mass Top-k decoding loses)

Rows (one per model x task x length x sample x layer x head x position; /work/notes/eval_schema.md) carry the
labels the caller gives, so traces of a normally trained and a Top-k fine-tuned model on the same prompts can be
compared with `entropy_shift`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from topklab.analysis.correlation import bootstrap, spearman
from topklab.fidelity.traces import LayerTrace, TraceFile

log = logging.getLogger(__name__)

ENTROPY_FILE = "entropy.parquet"
UNIT_KEYS = ("task", "length", "sample", "seq")  # one prompt: what varies between draws
LABEL_KEYS = ("model", "task", "length", "sample")


def entropy_from_logits(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy in nats of softmax(logits) along ``dim``; ``-inf`` logits are masked keys and add exactly 0."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=dim, keepdim=True)
    if not torch.isfinite(log_z).all():
        raise ValueError("every row needs at least one finite logit (a fully masked row has no distribution)")
    log_p = logits - log_z
    terms = torch.where(torch.isfinite(log_p), log_p.exp() * log_p, torch.zeros_like(log_p))
    return (0.0 - terms.sum(dim)).clamp_min(0.0)  # 0.0 - x: no negative zero


def topk_mass(logits: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """``[..., len(ks)]``: the softmax mass of the k largest logits along the last dim (1 where k >= N)."""
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.topk(min(max(ks), probs.shape[-1]), dim=-1).values.cumsum(-1)
    picks = torch.tensor([min(k, top.shape[-1]) - 1 for k in ks], device=top.device)
    return top.index_select(-1, picks).clamp_max(1.0)


def layer_entropy(trace: LayerTrace, ks: Sequence[int] = (16, 64, 256)) -> pd.DataFrame:
    """Entropy rows of one layer's decode positions: seq, layer, head, kv_head, position, context, entropy,
    norm_entropy, mass_at_k_<k> for each k."""
    if trace.prompt_len >= trace.length:
        raise ValueError(f"layer {trace.layer}: the trace has no decode positions (prompt_len = length = "
                         f"{trace.length}); capture it with prompt_len < length")
    positions = torch.arange(trace.prompt_len, trace.length)
    q = trace.q[:, :, positions].float()  # [B, Hq, P, d]
    keys = trace.k.float().repeat_interleave(trace.group_size, dim=1)  # [B, Hq, T, d]
    logits = torch.matmul(q, keys.transpose(-1, -2)) * trace.scale  # [B, Hq, P, T]
    causal = torch.arange(trace.length)[None, :] <= positions[:, None]  # [P, T]
    logits = logits.masked_fill(~causal, -math.inf)
    entropy = entropy_from_logits(logits)
    context = (positions + 1).float()
    norm = entropy / torch.log(context).clamp_min(1e-12)  # context 1: entropy is 0, and so is the ratio
    masses = topk_mass(logits, list(ks))
    batch, heads, steps = entropy.shape
    frame = pd.DataFrame({
        "seq": np.repeat(np.arange(batch), heads * steps),
        "layer": trace.layer,
        "head": np.tile(np.repeat(np.arange(heads), steps), batch),
        "position": np.tile(positions.numpy(), batch * heads),
        "entropy": entropy.reshape(-1).numpy(),
        "norm_entropy": norm.reshape(-1).numpy(),
    })
    frame.insert(3, "kv_head", frame["head"] // trace.group_size)
    frame.insert(5, "context", frame["position"] + 1)
    for i, k in enumerate(ks):
        frame[f"mass_at_k_{k}"] = masses[..., i].reshape(-1).numpy()
    return frame


def trace_entropy(trace: TraceFile, ks: Sequence[int] = (16, 64, 256), layers: Iterable[int] | None = None,
                  labels: Mapping[str, object] | None = None) -> pd.DataFrame:
    """Entropy rows of a saved trace over its layers (default: all it holds), labelled with model, task, length
    and sample: from ``labels`` where given, else from the trace's info (model; task defaults to the text source,
    sample to the document title) and its length."""
    info = trace.info
    defaults = {"model": info.get("model", "unknown"), "task": info.get("task", info.get("text", "text")),
                "length": trace.length, "sample": info.get("sample", info.get("title", trace.path.stem))}
    defaults.update(labels or {})
    frames = [layer_entropy(trace.layer(layer), ks) for layer in (trace.layers if layers is None else layers)]
    frame = pd.concat(frames, ignore_index=True)
    for i, key in enumerate(defaults):
        frame.insert(i, key, defaults[key])
    return frame


def task_entropy(model, tokenizer, tasks: Sequence[str] = ("passkey",), lengths: Sequence[int] = (1024,),
                 samples: int = 2, decode_steps: int = 8, layers="all", ks: Sequence[int] = (16, 64, 256),
                 seed: int = 0, model_name: str | None = None, filler: str | None = None) -> pd.DataFrame:
    """Entropy rows at the decode positions of task prompts (`topklab.tasks`, the samples `topklab eval` scores):
    each prompt is prefilled, then decoded greedily for ``decode_steps`` tokens with dense attention while q, k are
    captured; positions after the prompt are the decode positions. ``tokenizer=None``: byte tokens (tiny models).
    ``filler``: the haystack text of the tasks that have one ('wiki', a .txt file or folder; None: each task's own)."""
    from topklab.decoding.capture import capture
    from topklab.tasks import PromptCodec, make_with_filler

    if decode_steps < 2:
        raise ValueError(f"decode_steps must be >= 2 (the first token comes from the prefill), got {decode_steps}")
    codec = PromptCodec(tokenizer, vocab_size=model.config.vocab_size)
    name = model_name or model.config.name_or_path
    device = next(model.parameters()).device
    frames = []
    for spec in tasks:
        task = make_with_filler(spec, filler)
        for length in lengths:
            for index in range(samples):
                sample = task.sample(codec, length=length, index=index, seed=seed)
                ids = torch.tensor([sample.input_ids], device=device)
                traces, _ = capture(model, ids, layers, decode_steps=decode_steps)
                for trace in traces.values():
                    frame = layer_entropy(trace, ks)
                    for i, (key, value) in enumerate(zip(LABEL_KEYS, (name, sample.task, length, index))):
                        frame.insert(i, key, value)
                    frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def mass_columns(rows: pd.DataFrame) -> dict[int, str]:
    """k -> column name of the Top-k mass columns in entropy rows."""
    found = {int(c.removeprefix("mass_at_k_")): c for c in rows.columns if c.startswith("mass_at_k_")}
    if not found:
        raise ValueError("entropy rows hold no mass_at_k_<k> column; compute them with layer_entropy(..., ks)")
    return dict(sorted(found.items()))


def head_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (model, layer, head): mean entropy, normalised entropy and, for each k, the mean mass Top-k loses
    (``lost_at_k_<k>`` = 1 - mass kept), over positions and prompts."""
    group = [c for c in ("model", "layer", "head", "kv_head") if c in rows.columns]
    masses = mass_columns(rows)
    summary = rows.groupby(group, as_index=False, sort=True)[["entropy", "norm_entropy", *masses.values()]].mean()
    for k, column in masses.items():
        summary[f"lost_at_k_{k}"] = 1.0 - summary.pop(column)
    summary["positions"] = rows.groupby(group, sort=True).size().to_numpy()
    return summary


def entropy_mass_relation(rows: pd.DataFrame, n_resamples: int = 2000, confidence_level: float = 0.95,
                          seed: int = 0) -> pd.DataFrame:
    """Per model and k: Spearman rho across heads between a head's mean normalised entropy and the mass Top-k
    loses for it, with a bootstrap CI that resamples heads (the question is about heads, so heads are the unit;
    positions and prompts are averaged within a head first)."""
    summary = head_summary(rows)
    models = summary.groupby("model", sort=True) if "model" in summary else [("", summary)]
    out = []
    for model, heads in models:
        for k in mass_columns(rows):
            x, y = heads["norm_entropy"].to_numpy(), heads[f"lost_at_k_{k}"].to_numpy()
            record = {"model": model, "k": k, "heads": len(heads), "rho": np.nan, "ci_low": np.nan, "ci_high": np.nan}
            if len(heads) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
                record["rho"] = float(spearman(x, y))
                ci = bootstrap((x, y), spearman, paired=True, vectorized=True, n_resamples=n_resamples,
                               method="percentile", confidence_level=confidence_level, seed=seed)
                record["ci_low"], record["ci_high"] = ci.confidence_interval
            out.append(record)
    return pd.DataFrame(out)


def entropy_shift(rows: pd.DataFrame, baseline: str, column: str = "norm_entropy", n_resamples: int = 2000,
                  confidence_level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """How much each model's attention entropy differs from ``baseline``'s on the same prompts, per layer and over
    all layers (``layer`` <NA>): mean difference with a bootstrap CI that resamples prompts (paired: both models
    read the same ones). Negative = the model attends more sharply than the baseline (the study's claim 4 for a
    Top-k fine-tuned model against its normally trained base)."""
    if "model" not in rows or baseline not in set(rows["model"]):
        raise ValueError(f"baseline model {baseline!r} is not among the rows' models")
    units = [c for c in UNIT_KEYS if c in rows.columns]
    per_unit = rows.groupby(["model", "layer", *units], sort=True)[column].mean().unstack("model")
    out = []
    for model in per_unit.columns.drop(baseline):
        diff = (per_unit[model] - per_unit[baseline]).dropna()
        if diff.empty:
            raise ValueError(f"models {model!r} and {baseline!r} share no prompt and layer: nothing to pair")
        overall = diff.groupby(units, sort=True).mean()
        for layer, values in [*diff.groupby("layer", sort=True), (pd.NA, overall)]:  # NA: all layers
            values = values.to_numpy()
            record = {"model": model, "baseline": baseline, "layer": layer, "prompts": len(values),
                      "shift": values.mean(), "ci_low": np.nan, "ci_high": np.nan}
            if len(values) >= 2 and np.ptp(values) > 0:
                ci = bootstrap((values,), np.mean, n_resamples=n_resamples, method="percentile",
                               confidence_level=confidence_level, seed=seed)
                record["ci_low"], record["ci_high"] = ci.confidence_interval
            out.append(record)
    table = pd.DataFrame(out)
    table["layer"] = table["layer"].astype("Int64")
    return table
