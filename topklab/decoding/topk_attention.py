"""Top-k attention for Hugging Face causal LMs: each decode step attends only to the keys an indexer selects.

    with topk_attention(model, indexer="oracle:p=0.6", k=2048, per="group", sinks=4, window=64) as handle:
        tokens = model.generate(...)
    handle.recorder.frame()  # with record=True: recall@k and mass recall per step, layer, head, sequence

How the options read:

- ``k``: an int >= 1 is a count of keys; a float in (0, 1] is a ratio of the sequence's current context (its valid,
  non-padding keys): k = ceil(ratio * context). Where k >= context every key is attended.
- ``per``: ``"head"`` gives each query head its own Top-k; ``"group"`` one set per KV head, scored by the sum of its
  query heads' scores (for q.k scorers: the summed query); ``"layer"`` one set for all heads of the layer, scored by
  the sum over all heads (as DSA). An indexer with ``source = "hidden"`` scores hidden states and always selects
  per layer (the default ``per=None`` picks "layer" for it and "head" otherwise).
- ``sinks`` / ``window``: the first ``sinks`` and last ``window`` valid keys are always attended, in addition to
  the k the indexer picks (a key in both counts once): at most k + sinks + window keys per query.
- ``dense_layers``: layers left dense. Sliding-window layers (Gemma3's local layers) always stay dense: their cache
  is a rolling window that an incrementally built index cannot follow.
- ``prefill``: ``"dense"`` (the study's default) runs the prompt with dense attention; ``"sparse"`` applies causal
  Top-k at every prompt position too (the exact indexer in one masked pass; other indexers position by position,
  a slow reference).

Indexers keep state per layer and per group of sequences sharing the same left padding (lead dims
``[sequences, KV heads]``): built on the cache the first time a selection is needed, then extended with ``add``
each decode step; rebuilt only when a new sequence starts. Padded keys are never candidates. The plain ``exact``
indexer (per head or group) needs no index: it selects straight from the KV cache with `topklab.kernels.topk`
(Triton on CUDA), fused with the attention when there are no sinks, window, padding or recording. Attention over
the selection is `topklab.kernels.sparse_decode_attention` (Triton on CUDA, its torch reference elsewhere).

Static caches and CUDA graphs: with a transformers ``StaticCache`` every call sees the whole preallocated buffer
and a mask marking the written positions. Reading the valid range from that mask costs a host sync, so once a
batch's layout is known (its left padding, read on the host at the prefill or the first decode step), decode steps
of the plain exact indexer (an int k, per head or group, no sinks, window or recording) take each sequence's valid
keys [start, end) from the mask on the device and hand them to the kernel: such a step has no host sync and can be
captured in a CUDA graph (`topklab.decoding.generate.GreedyStep`). Every other configuration reads the mask on the
host as before.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from topklab import kernels
from topklab.decoding.hf import attention_hook, attention_modules, check_supported, dense_attention
from topklab.decoding.recorder import FidelityRecorder
from topklab.indexers import Indexer, KeyBuffer, make
from topklab.indexers.exact import Exact, exact_topk

log = logging.getLogger(__name__)

PER_CHOICES = ("head", "group", "layer")
PREFILL_CHOICES = ("dense", "sparse")

IndexerChoice = str | Indexer | Mapping[int, str | Indexer]


def check_k(k: int | float) -> int | float:
    """A count (int >= 1) or a ratio of the context (float in (0, 1])."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be an int count or a float ratio in (0, 1], got {type(k).__name__} ({k!r})")
    if isinstance(k, int) and k <= 0:
        raise ValueError(f"k must be >= 1 keys, got k = {k}")
    if isinstance(k, float) and not 0.0 < k <= 1.0:
        raise ValueError(
            f"a float k is a ratio of the context and must be in (0, 1], got k = {k}; pass an int for a key count"
        )
    return k


def check_count(name: str, value: int) -> int:
    """A count of keys or positions (sinks, window, a dense prefix): an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def resolve_k(k: int | float, context: int) -> int:
    """Keys to select from ``context`` valid keys: the count, or ceil(ratio * context); at least 1, at most context."""
    count = k if isinstance(k, int) else math.ceil(round(k * context * 1e9) / 1e9)
    return max(1, min(count, context))


def _resolve_k_per_query(k: int | float, context: torch.Tensor) -> torch.Tensor:
    """`resolve_k` for a tensor of contexts, by the same float64 arithmetic: the product is rounded to 1e-9 before
    the ceiling so a decimal ratio keeps what it says (0.07 of 100 keys is 7, not the 8 its binary product rounds up
    to), in decoding, sparse prefill and training alike."""
    if isinstance(k, int):
        return context.clamp_max(k)
    count = torch.ceil(torch.round(context.double() * k * 1e9) / 1e9).long()
    return count.clamp(1).minimum(context)


@dataclass
class _LayerState:
    """One layer's indexers: ``starts`` = each sequence's first valid key, ``end`` = one past the newest key seen."""

    starts: tuple[int, ...]
    end: int
    indexers: dict[int, Indexer] = field(default_factory=dict)  # group's first sequence -> index over [start, end)


class TopkAttention:
    """A model patched for Top-k attention; `restore()` (or leaving `topk_attention`) puts dense attention back."""

    def __init__(self, model: torch.nn.Module, indexer: IndexerChoice = "exact", *, k: int | float = 2048,
                 per: str | None = None, sinks: int = 0, window: int = 0, dense_layers: Sequence[int] = (),
                 prefill: str = "dense", record: bool = False):
        check_supported(model)
        self.model = model
        self.k = check_k(k)
        self.sinks, self.window = check_count("sinks", sinks), check_count("window", window)
        if prefill not in PREFILL_CHOICES:
            raise ValueError(f"prefill must be one of {', '.join(PREFILL_CHOICES)}, got {prefill!r}")
        self.prefill = prefill
        modules = attention_modules(model)
        unknown = sorted(set(dense_layers) - set(modules))
        if unknown:
            raise ValueError(
                f"dense_layers names layer(s) {unknown} but the model has layers {min(modules)}..{max(modules)}"
            )
        sliding = [i for i, module in modules.items() if getattr(module, "sliding_window", None)]
        if sliding:
            log.info("sliding-window layers %s stay dense (their cache is a rolling window)", sliding)
        self.sparse_layers = [i for i in modules if i not in dense_layers and i not in sliding]
        if not self.sparse_layers:
            log.warning("every layer of %s is dense: Top-k attention changes nothing", type(model).__name__)
        self._templates = {i: _template(indexer, i) for i in self.sparse_layers}
        sources = {t.source for t in self._templates.values()} or {"qk"}
        if len(sources) > 1:
            raise ValueError(f"mixing indexer sources {sorted(sources)} across layers is not supported")
        self.source = sources.pop()
        if self.source not in ("qk", "hidden"):
            raise ValueError(f"unknown indexer source {self.source!r}; expected 'qk' or 'hidden'")
        self.per = per if per is not None else ("layer" if self.source == "hidden" else "head")
        if self.per not in PER_CHOICES:
            raise ValueError(f"per must be one of {', '.join(PER_CHOICES)}, got {self.per!r}")
        if self.source == "hidden" and self.per != "layer":
            raise ValueError(
                "an indexer with source='hidden' selects one set per token for the whole layer: use per='layer'"
            )
        self._vectorised_prefill = self.source == "qk" and all(t.name == "exact" for t in self._templates.values())
        # the plain exact indexer reads the KV cache itself (no copy of the keys to build or extend)
        self._from_cache = self.per != "layer" and all(type(t) is Exact for t in self._templates.values())
        #: decode steps read nothing on the host (left padding included), so they can be captured in a CUDA graph
        self.sync_free_decode = (self._from_cache and not record and not sinks and not window
                                  and isinstance(self.k, int))
        self.recorder = FidelityRecorder() if record else None
        self._states: dict[int, _LayerState] = {}
        self._hidden: dict[int, KeyBuffer] = {}
        self._hidden_now: dict[int, torch.Tensor] = {}
        self._steps: dict[int, int] = {}
        self._last_mask: tuple[torch.Tensor | None, tuple] = (None, ())
        self._last_ranges: tuple[torch.Tensor | None, tuple] = (None, (None, None))
        self._layout: tuple[int, ...] | None = None  # each sequence's first valid key, as last read on the host
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(attention_hook(model, self.attention))
        if self.source == "hidden":
            for i in self.sparse_layers:
                handle = modules[i].register_forward_pre_hook(self._capture_hidden, with_kwargs=True)
                self._stack.callback(handle.remove)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def restore(self) -> None:
        """Put the model's own attention back (idempotent)."""
        self._stack.close()
        self.reset()

    def reset(self) -> None:
        """Forget all indexer state (the next step rebuilds); recorded rows are kept."""
        self._states.clear()
        self._hidden.clear()
        self._hidden_now.clear()
        self._steps.clear()
        self._last_mask = (None, ())
        self._last_ranges = (None, (None, None))
        self._layout = None

    def __enter__(self) -> "TopkAttention":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    # -- the attention function transformers calls -----------------------------------------------------------
    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """The attention function transformers calls for every layer (registered while the handle is active)."""
        layer = module.layer_idx
        dense = dict(scaling=scaling, dropout=dropout, **kwargs)
        if layer not in self._templates:
            return dense_attention(module, query, key, value, attention_mask, **dense)
        if kwargs.get("softcap") is not None:
            raise ValueError("Top-k attention does not support attention logit soft-capping (softcap)")
        q_len = query.shape[2]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if q_len == 1 and self.sync_free_decode and self._layout is not None and len(self._layout) == query.shape[0]:
            self._steps[layer] = self._steps.get(layer, 0) + 1
            return self._device_step(module, query, key, value, attention_mask, scale, dense)
        starts, end = self._valid_range(attention_mask, key.shape[2], query.shape[0], q_len)
        if end == q_len:  # nothing was cached before this call: a new sequence
            self._states.pop(layer, None)
            self._steps[layer] = 0
        hidden = self._hidden_history(layer, q_len, end) if self.source == "hidden" else None
        if q_len > 1 and self.prefill == "dense":
            return dense_attention(module, query, key, value, attention_mask, **dense)
        if q_len > 1:
            return self._sparse_prefill(layer, query, key, value, starts, end, hidden, scale), None
        out = self._step(layer, query, key, value, starts, end, hidden, scale, record=self.recorder is not None)
        self._steps[layer] = self._steps.get(layer, 0) + 1
        return out, None

    def _device_step(self, module, query, key, value, mask, scale, dense):
        """A decode step of the plain exact indexer with no host sync: each sequence's valid keys [start, end) stay
        on the device (none without a mask: every key is valid), so the step can run inside a CUDA graph. The
        batch's left padding was checked on the host when its layout was first read (prefill or first step)."""
        if self.k >= key.shape[2]:  # k covers every key the cache can hold: dense attention, same mask
            return dense_attention(module, query, key, value, mask, **dense)
        starts, ends = (None, None) if mask is None else self._device_ranges(mask, key.shape[2], query.shape[0])
        out = kernels.topk_attention(query[:, :, 0], key, value, self.k, scale=scale, lengths=ends, starts=starts,
                                     per_kv_head=self.per == "group")
        return out[:, None], None

    def _device_ranges(self, mask: torch.Tensor, kv_len: int, batch: int):
        """Each sequence's first valid key (None for an unpadded batch) and one past its newest, ``[B]`` int32 on
        the device, from the mask of the last query position (valid keys are contiguous: left padding)."""
        if mask is not self._last_ranges[0]:  # every layer of one forward pass gets the same mask
            visible = _visible(mask, kv_len).expand(batch, -1)
            starts = None if not any(self._layout) else visible.int().argmax(-1).to(torch.int32)
            ends = visible.sum(-1, dtype=torch.int32) + (0 if starts is None else starts)
            self._last_ranges = (mask, (starts, ends))
        return self._last_ranges[1]

    def _valid_range(self, mask, kv_len: int, batch: int, q_len: int) -> tuple[tuple[int, ...], int]:
        """(first valid key of each sequence, one past the newest key) from the mask of the last query position.

        transformers passes no mask for a causal prefill from an empty cache without padding; a static cache then
        hands over its whole buffer, of which the prompt fills the first ``q_len`` positions."""
        if mask is None:
            self._layout = (0,) * batch
            return self._layout, q_len if q_len > 1 else kv_len
        if mask is self._last_mask[0]:  # every layer of one forward pass gets the same mask
            return self._last_mask[1]
        row = _visible(mask, kv_len).expand(batch, -1).int()
        last = kv_len - 1 - row.flip(-1).argmax(-1)
        counts, firsts, lasts = torch.stack([row.sum(-1), row.argmax(-1), last]).tolist()
        for seq, (count, first, last) in enumerate(zip(counts, firsts, lasts)):
            if count == 0:
                raise ValueError(f"sequence {seq} of the batch has no valid key at this step (an all-padding row?)")
            if count != last - first + 1:
                raise ValueError(
                    f"sequence {seq}'s valid keys are not contiguous; Top-k attention supports left padding only "
                    "(tokenizer.padding_side = 'left')"
                )
        if len(set(lasts)) > 1:
            raise ValueError("the sequences of the batch end at different cache positions; use left padding")
        result = (tuple(firsts), lasts[0] + 1)
        self._last_mask = (mask, result)
        self._layout = result[0]
        return result

    # -- hidden states for source="hidden" indexers ----------------------------------------------------------
    def _capture_hidden(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None:
            raise RuntimeError(
                f"found no hidden_states input to {type(module).__name__}; cannot feed a hidden-state indexer"
            )
        self._hidden_now[module.layer_idx] = hidden.detach()

    def _hidden_history(self, layer: int, q_len: int, end: int) -> torch.Tensor:
        """Attention-input hidden states of every cached token ``[B, end, D]`` (they are not in the KV cache)."""
        current = self._hidden_now.pop(layer)
        history = self._hidden.get(layer)
        if end == q_len:
            history = KeyBuffer(current)
        elif history is None or history.n + q_len != end:
            raise ValueError(
                "a hidden-state indexer needs the hidden states of every cached token, but the cache holds tokens "
                "seen outside topk_attention; enter the context before the prompt's prefill"
            )
        else:
            history.append(current)
        self._hidden[layer] = history
        return history.data

    # -- selection: every `_step` is one query position per sequence -------------------------------------------
    def _queries(self, query: torch.Tensor, hidden: torch.Tensor | None, end: int) -> torch.Tensor:
        """The indexer's queries: ``[B, Hkv, G, d]`` per head, ``[B, Hkv, 1, d]`` per group, ``[B, 1, 1, Hkv*d]``
        per layer (summed over the heads they stand for), ``[B, 1, D]`` hidden states."""
        batch, heads, _, dim = query.shape
        if hidden is not None:
            return hidden[:, end - 1 : end]
        grouped = query.detach().view(batch, self._kv_heads, heads // self._kv_heads, dim)
        if self.per == "head":
            return grouped
        summed = grouped.float().sum(2, keepdim=True).to(query.dtype)
        return summed if self.per == "group" else summed.transpose(1, 2).flatten(2).unsqueeze(1)

    def _vectors(self, key: torch.Tensor, hidden: torch.Tensor | None, rows, lo: int, hi: int) -> torch.Tensor:
        """The indexed vectors of cache positions [lo, hi) for sequences ``rows``, laid out as `_queries`."""
        if hidden is not None:
            return hidden[rows, lo:hi]
        part = key[rows, :, lo:hi].detach()
        return part.transpose(1, 2).flatten(2).unsqueeze(1) if self.per == "layer" else part

    def _to_heads(self, indices: torch.Tensor, groups: int) -> torch.Tensor:
        """Selections ``[b, R, S]`` (R = Hq, Hkv or 1 by ``per``) -> one per query head ``[b, Hkv, G, S]`` (a view)."""
        b, rows, s = indices.shape
        return indices.view(b, min(rows, self._kv_heads), -1, s).expand(b, self._kv_heads, groups, s)

    def _step(self, layer, query, key, value, starts, end, hidden, scale, record: bool) -> torch.Tensor:
        """Attention of one query position per sequence over its selection; ``key``/``value`` end at ``end``."""
        batch, heads = query.shape[:2]
        self._kv_heads = key.shape[1]
        key, value = key[:, :, :end], value[:, :, :end]
        state = self._states.get(layer)
        if state is None or state.starts != starts or state.end != end - 1:
            state = _LayerState(starts, end - 1)
        groups = _groups(starts, query.device, apart=self._templates[layer].stochastic)
        plain = not (record or self.sinks or self.window) and len(groups) == 1 and groups[0][0] == 0
        if self._from_cache and plain and resolve_k(self.k, end) < end:
            # select + attend in one kernel call: the selection's scores are reused, only V is gathered
            out = kernels.topk_attention(query[:, :, 0], key, value, resolve_k(self.k, end), scale=scale,
                                         per_kv_head=self.per == "group")
            return out[:, None]
        queries = self._queries(query, hidden, end)
        picks = []
        for start, rows, seqs in groups:
            context = end - start
            if context <= 0:  # a padding position of sparse prefill: nothing to attend to yet
                picks.append((rows, queries.new_empty(0, dtype=torch.long)))
                continue
            k = resolve_k(self.k, context)
            indexer = state.indexers.get(seqs[0])
            if indexer is not None:
                indexer.add(self._vectors(key, hidden, rows, end - 1, end))
            if k >= context:
                picks.append((rows, torch.arange(start, end, device=query.device)))
                continue
            if self._from_cache:
                picked = kernels.topk(query[rows, :, 0], key[rows, :, start:], k, per_kv_head=self.per == "group",
                                      sorted=False)[1]
            else:
                if indexer is None:
                    indexer = state.indexers[seqs[0]] = copy.deepcopy(self._templates[layer])
                    indexer.build(self._vectors(key, hidden, rows, start, end))
                picked = indexer.search(queries[rows], k)
                picked = picked.reshape(picked.shape[0], -1, k)
            picked = _shift(picked, start)
            attended = self._with_fixed(picked, start, end, distinct=self._from_cache)
            if record:
                self._record(layer, seqs, rows, query, key, value, start, end, k, picked, attended, scale)
            picks.append((rows, attended))
        state.end = end
        self._states[layer] = state
        rows_per_seq = {"head": heads, "group": self._kv_heads, "layer": 1}[self.per]
        indices = _merge(picks, batch, rows_per_seq)
        if rows_per_seq == 1:  # one set per layer: the kernel takes one per KV head
            indices = indices.expand(batch, self._kv_heads, -1)
        return kernels.sparse_decode_attention(query[:, :, 0], key, value, indices, scale)[:, None]

    def _with_fixed(self, picked: torch.Tensor, start: int, end: int, distinct: bool = False) -> torch.Tensor:
        """The picks plus sinks and window, each key once (repeats become -1); ``distinct`` picks skip the check."""
        fixed = []
        if self.sinks:
            fixed.append(torch.arange(start, min(start + self.sinks, end), device=picked.device))
        if self.window:
            fixed.append(torch.arange(max(start, end - self.window), end, device=picked.device))
        if not fixed and distinct:
            return picked
        if fixed:
            extra = torch.cat(fixed)
            picked = torch.cat([picked, extra.expand(*picked.shape[:-1], extra.numel())], dim=-1)
        ordered = picked.sort(dim=-1).values
        repeat = torch.zeros_like(ordered, dtype=torch.bool)
        repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
        return ordered.masked_fill(repeat, -1)

    def _record(self, layer, seqs, rows, query, key, value, start, end, k, picked, attended, scale) -> None:
        """Compare this step's selection with exact Top-k chosen the same way (per head / group / layer)."""
        exact = exact_topk(self._queries(query, None, end)[rows], self._vectors(key, None, rows, start, end), k)[1]
        exact = _shift(exact.reshape(exact.shape[0], -1, k), start)
        groups = query.shape[1] // self._kv_heads

        def heads(indices):  # absolute [b, R, S] -> relative to start, per query head [b, Hkv, G, S]
            return _shift(self._to_heads(indices, groups), -start)

        q = query[rows][:, :, 0].view(-1, self._kv_heads, groups, query.shape[-1])
        self.recorder.record(
            step=self._steps.get(layer, 0), layer=layer, seqs=seqs, indexer=self._templates[layer].spec,
            per=self.per, k=k, q=q, keys=key[rows, :, start:end], values=value[rows, :, start:end],
            picked=heads(picked), attended=heads(attended), exact=heads(exact),
            exact_attended=heads(self._with_fixed(exact, start, end, distinct=True)), scale=scale,
        )

    def _sparse_prefill(self, layer, query, key, value, starts, end, hidden, scale) -> torch.Tensor:
        """Causal Top-k at every prompt position."""
        q_len = query.shape[2]
        if self._vectorised_prefill:
            positions = torch.arange(end - q_len, end, device=query.device)[:, None]
            keys = torch.arange(key.shape[2], device=query.device)
            first = torch.tensor(starts, device=query.device)[:, None, None]
            valid = (keys >= first) & (keys <= positions)
            return masked_topk_attention(query, key, value, valid, k=self.k, per=self.per, sinks=self.sinks,
                                         window=self.window, scale=scale)
        outputs = []
        for i in range(q_len):
            stop = end - q_len + i + 1
            outputs.append(self._step(layer, query[:, :, i : i + 1], key[:, :, :stop], value[:, :, :stop], starts,
                                      stop, hidden, scale, record=False))
        return torch.cat(outputs, dim=1)


def _template(indexer: IndexerChoice, layer: int) -> Indexer:
    """The (unbuilt) indexer to copy for ``layer``."""
    if isinstance(indexer, Mapping):
        if layer not in indexer:
            raise ValueError(f"the indexer mapping has no entry for layer {layer}; add one or list it in dense_layers")
        indexer = indexer[layer]
    if isinstance(indexer, str):
        template = make(indexer).require_fitted()
    elif isinstance(indexer, Indexer):
        template = copy.deepcopy(indexer.require_fitted())
    else:
        raise TypeError("indexer must be a spec string, an Indexer or a {layer: spec or Indexer} mapping, "
                        f"got {type(indexer).__name__}")
    if template.fitted_layer is not None and template.fitted_layer != layer:
        raise ValueError(f"{template.spec} was fitted on layer {template.fitted_layer}, not {layer}: pass a "
                         "{layer: indexer} mapping of indexers fitted per layer (or list the others in dense_layers)")
    return template


def _visible(mask: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The keys the last query position may attend to, ``[B or 1, kv_len]`` bool, from a bool or additive mask."""
    row = mask[:, 0, -1, :kv_len]
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


def _groups(starts: tuple[int, ...], device, apart: bool = False) -> list[tuple[int, slice | torch.Tensor, list[int]]]:
    """Sequences sharing a first valid key: (start, row selector, sequence numbers); one group without padding.
    ``apart``: every sequence in a group of its own (a batch of one is one group either way)."""
    if len(starts) == 1 or (not apart and len(set(starts)) == 1):
        return [(starts[0], slice(None), list(range(len(starts))))]
    sets = [[b] for b in range(len(starts))] if apart else \
        [[b for b, s in enumerate(starts) if s == start] for start in sorted(set(starts))]
    return [(starts[seqs[0]], torch.tensor(seqs, device=device), seqs) for seqs in sets]


def _shift(indices: torch.Tensor, offset: int) -> torch.Tensor:
    """Add ``offset`` to every index, leaving -1 (empty slot) as is."""
    return torch.where(indices >= 0, indices + offset, indices)


def _merge(picks, batch: int, rows_per_seq: int) -> torch.Tensor:
    """Per-group selections -> one ``[B, R, S]`` tensor, padded with -1 (a 1-D pick is shared by all rows)."""
    if len(picks) == 1 and picks[0][1].dim() == 3:
        return picks[0][1]
    width = max(1, max(p.shape[-1] for _, p in picks))
    device = picks[0][1].device
    out = torch.full((batch, rows_per_seq, width), -1, dtype=torch.long, device=device)
    for rows, picked in picks:
        out[rows, ..., : picked.shape[-1]] = picked
    return out


def masked_topk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, *,
                          k: int | float, per: str = "head", sinks: int = 0, window: int = 0,
                          scale: float | None = None) -> torch.Tensor:
    """Exact Top-k attention in one masked dense pass: the reference, and sparse prefill for the exact indexer.

    query ``[B, Hq, T, d]``, key/value ``[B, Hkv, N, d]``, ``valid [B, T, N]`` the keys each query may see (causal
    and padding). Each query attends to its k best valid keys (scored per head, group or layer as in
    `TopkAttention`) plus the first ``sinks`` and last ``window`` valid ones. Differentiable in q, k, v.
    Returns ``[B, T, Hq, d_v]``.
    """
    check_k(k)
    if per not in PER_CHOICES:
        raise ValueError(f"per must be one of {', '.join(PER_CHOICES)}, got {per!r}")
    batch, heads, q_len, dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    logits = torch.matmul(query.reshape(batch, kv_heads, groups * q_len, dim).float(), key.float().transpose(-1, -2))
    logits = logits.view(batch, kv_heads, groups, q_len, n) * scale
    score = {"head": logits, "group": logits.sum(2, keepdim=True), "layer": logits.sum((1, 2), keepdim=True)}[per]
    visible = valid[:, None, None]
    context = valid.sum(-1)  # [B, T]
    counts = _resolve_k_per_query(k, context)
    widest = max(1, int(counts.max()))
    top = score.detach().masked_fill(~visible, -math.inf).topk(min(widest, n), dim=-1).indices
    keep = torch.arange(top.shape[-1], device=query.device) < counts[:, None, None, :, None]
    chosen = torch.zeros(score.shape, dtype=torch.bool, device=query.device).scatter_(-1, top, keep.expand(top.shape))
    rank = valid.cumsum(-1)  # 1-based rank among the valid keys
    fixed = valid & ((rank <= sinks) | (rank > context[..., None] - window))
    chosen = (chosen | fixed[:, None, None]) & visible
    probs = torch.softmax(logits.masked_fill(~chosen, -math.inf), dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, value.float().unsqueeze(2))
    return out.reshape(batch, heads, q_len, value.shape[-1]).transpose(1, 2).to(query.dtype).contiguous()


def enable_topk_attention(model: torch.nn.Module, indexer: IndexerChoice = "exact", **options) -> TopkAttention:
    """Patch ``model`` for Top-k attention until `TopkAttention.restore` is called. Options: see the module doc."""
    return TopkAttention(model, indexer, **options)


@contextlib.contextmanager
def topk_attention(model: torch.nn.Module, indexer: IndexerChoice = "exact", **options) -> Iterator[TopkAttention]:
    """Within the context ``model`` decodes with Top-k attention; on exit its own attention is back."""
    handle = enable_topk_attention(model, indexer, **options)
    try:
        yield handle
    finally:
        handle.restore()


__all__ = [
    "PER_CHOICES", "PREFILL_CHOICES", "TopkAttention", "check_k", "enable_topk_attention", "masked_topk_attention",
    "check_count", "resolve_k", "topk_attention",
]
