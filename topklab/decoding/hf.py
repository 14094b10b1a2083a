"""The one place topklab touches transformers' internals: routing a model's attention through our own function.

transformers (>= 4.48, 5.x) dispatches attention through a registry (``AttentionInterface``): a registered
function receives ``(module, query [B, Hq, q_len, d], key/value [B, Hkv, kv_len, d] (the whole cache, GQA not
expanded), attention_mask, scaling=..., dropout=..., **kw)`` and ``module.layer_idx`` names the layer. We register
a uniquely named function for the lifetime of a context, register the SDPA mask builder under the same name (or
the mask arrives as None and left-padded batches go wrong) and restore the model's previous implementation on exit.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable, Iterator

import torch

_COUNTER = itertools.count()

#: hook(module, query, key, value, attention_mask, scaling, dropout, **kwargs) -> (attn_output [B, q_len, Hq, d], weights)
AttentionHook = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def _transformers():
    try:
        import transformers  # noqa: F401
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "topklab's Hugging Face adapters need transformers >= 4.56: pip install 'topklab[hf]'"
        ) from err
    return AttentionInterface, AttentionMaskInterface, sdpa_attention_forward, sdpa_mask


def dense_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' own SDPA attention: the dense path hooks fall back to."""
    return _transformers()[2](module, query, key, value, attention_mask, **kwargs)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``cache`` in recent transformers, ``past_key_values``
    before (5.17 and older)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def static_cache(model: torch.nn.Module, max_cache_len: int):
    """A transformers ``StaticCache`` of ``max_cache_len`` positions for ``model`` (allocated on its first update).

    Its buffers keep their address and its length lives on the device, so a decode step over it can be captured in a
    CUDA graph; the attention then sees the whole buffer with a mask marking the written positions."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


def check_supported(model: torch.nn.Module) -> None:
    """Raise a clear error for models whose attention does not go through the registry."""
    can = getattr(model, "_can_set_attn_implementation", None)
    if can is None or not can():
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, so "
            "topklab cannot hook it; supported are models with the functional attention API (Llama, Qwen2/3, "
            "Mistral, Gemma3, ...)"
        )
    if getattr(model.config, "attn_logit_softcapping", None):
        raise ValueError(
            f"{type(model).__name__} soft-caps its attention logits (attn_logit_softcapping = "
            f"{model.config.attn_logit_softcapping}), which topklab's Top-k scoring and its dense fallback (SDPA) do "
            "not apply; use a model without soft-capping (Gemma3 instead of Gemma2, Llama, Qwen, Mistral, ...)"
        )


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """layer_idx -> the attention module of that decoder layer."""
    found = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "layer_idx"):
            found[int(module.layer_idx)] = module
    if not found:
        raise ValueError(f"found no `*.self_attn` modules with a layer_idx in {type(model).__name__}")
    return dict(sorted(found.items()))


@contextlib.contextmanager
def attention_hook(model: torch.nn.Module, hook: AttentionHook) -> Iterator[str]:
    """Within the context every attention call of ``model`` goes to ``hook``; yields the registered name."""
    attention_interface, mask_interface, _, sdpa_mask = _transformers()
    check_supported(model)
    name = f"topklab_{next(_COUNTER)}"
    attention_interface.register(name, hook)
    mask_interface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield name
    finally:
        model.set_attn_implementation(previous)
        attention_interface._global_mapping.pop(name, None)
        mask_interface._global_mapping.pop(name, None)
