"""Capture attention traces from any Hugging Face causal LM through the attention registry (no model edits)."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from topklab.decoding.hf import attention_hook, attention_modules, dense_attention
from topklab.fidelity.traces import LayerTrace

log = logging.getLogger(__name__)


def resolve_layers(model: torch.nn.Module, layers: str | list[int] | None) -> list[int]:
    """``None``/``"all"`` -> every layer; ``"spread:8"`` -> 8 evenly spaced layers (first and last included);
    ``"0,4,8"`` or ``[0, 4, 8]`` -> those layers (checked against the model)."""
    available = list(attention_modules(model))
    if layers is None or layers == "all":
        return available
    if isinstance(layers, str) and layers.startswith("spread:"):
        count = int(layers.removeprefix("spread:"))
        if count < 1:
            raise ValueError(f"spread:N needs N >= 1, got {layers!r}")
        if count >= len(available):
            return available
        picks = torch.linspace(0, len(available) - 1, count).round().long().tolist()
        return sorted({available[i] for i in picks})
    chosen = [int(x) for x in layers.split(",")] if isinstance(layers, str) else [int(x) for x in layers]
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f"layer(s) {unknown} do not exist; the model has layers {available[0]}..{available[-1]}")
    return sorted(set(chosen))


@torch.no_grad()
def capture(model: torch.nn.Module, input_ids: torch.Tensor, layers=None, decode_steps: int = 0,
            prompt_len: int | None = None) -> tuple[dict[int, LayerTrace], torch.Tensor]:
    """Run ``model`` on ``input_ids [B, T]`` (no padding) and record q, k, v and attention-input hidden states.

    With ``decode_steps = 0`` the whole sequence is one forward pass; positions from ``prompt_len`` on are then
    teacher-forced decode positions (their q, k, v equal step-by-step decoding's). With ``decode_steps > 0`` the
    model also generates that many tokens greedily and each decode step is recorded. Returns the traces (float32,
    on the model's device) and the token ids that were processed.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    prompt_len = length if prompt_len is None else prompt_len
    if decode_steps and prompt_len != length:
        raise ValueError("prompt_len must equal the input length when decode_steps > 0")
    if not 1 <= prompt_len <= length:
        raise ValueError(f"prompt_len must be in [1, {length}], got {prompt_len}")
    wanted = resolve_layers(model, layers)
    modules = attention_modules(model)
    record: dict[int, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    scales: dict[int, float] = {}

    def hook(module, query, key, value, attention_mask, **kwargs):
        idx = module.layer_idx
        if idx in wanted:
            new = query.shape[2]
            rec = record[idx]
            rec["q"].append(query.float())
            rec["k"].append(key[:, :, -new:].float())
            rec["v"].append(value[:, :, -new:].float())
            scales[idx] = float(kwargs.get("scaling") or query.shape[-1] ** -0.5)
        return dense_attention(module, query, key, value, attention_mask, **kwargs)

    def hidden_hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        record[module.layer_idx]["hidden"].append(hidden.float())

    handles = [modules[i].register_forward_pre_hook(hidden_hook, with_kwargs=True) for i in wanted]
    try:
        with attention_hook(model, hook):
            if decode_steps:
                # a growing cache, whatever the model's generation config asks for: the hook reads each call's new
                # keys off the end of the cache, which a static cache's preallocated buffer does not hold there
                ids = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=decode_steps,
                                     do_sample=False, pad_token_id=_pad_id(model), cache_implementation="dynamic")
            else:
                model(input_ids, use_cache=False)
                ids = input_ids
    finally:
        for handle in handles:
            handle.remove()
    traces = {
        idx: LayerTrace(
            layer=idx,
            q=torch.cat(record[idx]["q"], dim=2),
            k=torch.cat(record[idx]["k"], dim=2),
            v=torch.cat(record[idx]["v"], dim=2),
            hidden=torch.cat(record[idx]["hidden"], dim=1),
            scale=scales[idx],
            prompt_len=prompt_len,
        )
        for idx in wanted
    }
    processed = traces[wanted[0]].length
    return traces, ids[:, :processed]


def _pad_id(model: torch.nn.Module) -> int:
    """A pad id for generate on an unpadded batch: the EOS id (the first, where the config lists several), else 0."""
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return 0 if eos is None else int(eos)
