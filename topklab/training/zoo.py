"""A small model zoo: Llama-architecture models trained from scratch on the synthetic tasks, from a config file.

Controlled experiments should not hang on one pretrained model. A zoo model is a few-million-parameter Llama with
byte-level tokens (ids 0-255 are UTF-8 bytes, as `topklab.tasks.ByteTokenizer`; 256 = EOS, 257 = padding), trained
with the loop of `topklab.training.topk_sft` (dense by default; a ``train.topk`` section trains natively Top-k from
scratch). The checkpoint is a Hugging Face folder (config.json, model.safetensors, a byte-level tokenizer.json) plus
zoo.json (the config it came from) and train_log.csv, so ``topklab eval --model FOLDER`` reads it like any model.

    python -m topklab.training.zoo experiments/zoo/configs/zoo-s.json --out results/zoo/zoo-s
    model, tokenizer = load_zoo_model("results/zoo/zoo-s")

Config (JSON or TOML), every section optional except ``name``:
    name   : str
    seed   : int (weights and data order; default 0)
    model  : layers, hidden, heads, kv_heads, intermediate, max_position, rope_theta
    data   : `topklab.training.topk_sft.TaskData` fields (tasks, lengths, loss_on, data_seed, filler)
    train  : `topklab.training.topk_sft.TrainConfig` fields (steps, batch_size, lr, warmup, ..., topk)
The same config and seed give the same model on CPU (GPU kernels may differ in the last bits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from topklab.training.topk_sft import TaskData, TrainConfig, finetune, save_checkpoint

log = logging.getLogger(__name__)

EOS_ID, PAD_ID = 256, 257
VOCAB_SIZE = 258
CONFIG_FILE = "zoo.json"


@dataclass
class ModelSpec:
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 768
    max_position: int = 4096
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "max_position"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive int, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"model.hidden ({self.hidden}) must be a multiple of model.heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"model.heads ({self.heads}) must be a multiple of model.kv_heads ({self.kv_heads})")
        if (self.hidden // self.heads) % 2:
            raise ValueError(f"the head dim hidden / heads = {self.hidden // self.heads} must be even for RoPE")


@dataclass
class ZooConfig:
    name: str
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    data: TaskData = field(default_factory=TaskData)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("a zoo config needs a non-empty 'name'")
        too_long = [n for n in self.data.lengths if n > self.model.max_position]
        if too_long:
            raise ValueError(f"data.lengths {too_long} exceed model.max_position = {self.model.max_position}")
        self.train.seed = self.seed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_from_dict(raw: dict) -> ZooConfig:
    """Build and check a `ZooConfig`; unknown or misspelt keys are errors, not silently ignored."""
    if not isinstance(raw, dict):
        raise ValueError(f"a zoo config is a mapping of sections, got {type(raw).__name__}")
    sections = {"model": ModelSpec, "data": TaskData, "train": TrainConfig}
    _check_keys(raw, {"name", "seed", *sections}, "the config")
    if "name" not in raw:
        raise ValueError("a zoo config needs a 'name'")
    built = {}
    for key, cls in sections.items():
        section = raw.get(key, {})
        if not isinstance(section, dict):
            raise ValueError(f"section '{key}' must be a mapping, got {type(section).__name__}")
        _check_keys(section, {f.name for f in dataclasses.fields(cls)}, f"section '{key}'")
        if key == "train" and isinstance(section.get("topk"), dict):
            _check_keys(section["topk"], {"k", "per", "sinks", "window", "dense_layers"}, "section 'train.topk'")
        try:
            built[key] = cls(**section)
        except TypeError as err:
            raise ValueError(f"section '{key}': {err}") from None
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return ZooConfig(name=raw["name"], seed=seed, **built)


def load_config(path: str | Path) -> ZooConfig:
    """Read a zoo config from a .json or .toml file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"zoo config {path} does not exist")
    if path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    elif path.suffix == ".toml":
        import tomllib

        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from None
    else:
        raise ValueError(f"zoo configs are .json or .toml files, got {path.name}")
    return config_from_dict(raw)


def byte_tokenizer():
    """A Hugging Face tokenizer that maps text to its UTF-8 bytes (ids 0-255) with EOS 256 and padding 257.

    The same ids as `topklab.tasks.ByteTokenizer`; saved with the checkpoint so that any tool that loads a folder's
    tokenizer reads a zoo model correctly. Special-token strings in the text stay bytes (``split_special_tokens``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab["</s>"], vocab["<pad>"] = EOS_ID, PAD_ID
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
                                   split_special_tokens=True)


def is_byte_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` encodes text as the zoo's plain UTF-8 byte ids (as `byte_tokenizer` does)."""
    if tokenizer is None or getattr(tokenizer, "eos_token_id", None) != EOS_ID:
        return False
    probe = "Zoo probe: 42 </s> é"
    return list(tokenizer(probe, add_special_tokens=True)["input_ids"]) == list(probe.encode("utf-8"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which the ByteLevel pre-tokenizer emits."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_model(config: ZooConfig) -> torch.nn.Module:
    """The untrained LlamaForCausalLM of ``config.model``, initialised from ``config.seed``."""
    import transformers

    spec = config.model
    llama = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads, max_position_embeddings=spec.max_position, rope_theta=spec.rope_theta,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        attention_dropout=0.0,
    )
    llama._attn_implementation = "sdpa"
    torch.manual_seed(config.seed)
    model = transformers.LlamaForCausalLM(llama)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.config.name_or_path = config.name
    return model


def train_zoo_model(config: ZooConfig, out: str | Path, device: str = "cpu") -> Path:
    """Train ``config`` from scratch and save the checkpoint folder ``out``."""
    model = build_model(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    log.info("zoo model %s: %.2f M parameters, %d steps on %s", config.name, params / 1e6, config.train.steps, device)
    tokenizer = byte_tokenizer()
    start = time.perf_counter()
    frame = finetune(model, tokenizer, config.data, config.train, desc=f"zoo {config.name}")
    meta = {"kind": "zoo", "parameters": params, "device": str(device), "seconds": time.perf_counter() - start,
            "steps_done": len(frame), "torch": torch.__version__}
    return save_checkpoint(model.to("cpu"), tokenizer, out, meta, frame,
                           {CONFIG_FILE: json.dumps(config.to_dict(), indent=2)})


def is_zoo_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_zoo_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a zoo checkpoint folder (also one fine-tuned from a zoo model)."""
    import transformers

    path = Path(path)
    if not is_zoo_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a zoo checkpoint (no {CONFIG_FILE}); train one with "
                                "python -m topklab.training.zoo CONFIG --out FOLDER")
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; the training run that wrote it did not finish")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.config.name_or_path = str(path)
    return model, byte_tokenizer()


def zoo_config_of(path: str | Path) -> ZooConfig:
    """The config a zoo checkpoint was trained from."""
    return config_from_dict(json.loads((Path(path) / CONFIG_FILE).read_text()))


def export_filler(folder: str | Path, source: str = "wiki") -> int:
    """Write ``source``'s documents as numbered .txt files: ``data.filler = FOLDER`` then yields the very same
    sentences as ``source`` on a machine without gensim (the files keep the documents' order)."""
    from topklab.text import load_texts

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    docs = load_texts(source)
    for i, doc in enumerate(docs):
        (folder / f"{i:04d}.txt").write_text(doc.text, encoding="utf-8")
    return len(docs)


def _check_keys(section: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; valid: {', '.join(sorted(allowed))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m topklab.training.zoo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="zoo config (.json or .toml)")
    parser.add_argument("--out", help="checkpoint folder (default: results/zoo/NAME)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="override train.steps (quick trials)")
    parser.add_argument("--filler", help="override data.filler: a .txt file or folder (machines without gensim)")
    parser.add_argument("--workers", type=int, help="override train.workers (DataLoader processes)")
    parser.add_argument("--max-seconds", type=float, help="override train.max_seconds (stop early past it)")
    parser.add_argument("--export-filler", metavar="FOLDER",
                        help="write the bundled Wikipedia text as .txt files to FOLDER (for --filler) and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.export_filler:
        print(f"wrote {export_filler(args.export_filler)} files to {args.export_filler}")
        return 0
    if not args.config:
        parser.error("give a zoo config file")
    try:
        config = load_config(args.config)
        if args.steps is not None:
            config.train = dataclasses.replace(config.train, steps=args.steps)
        if args.workers is not None:
            config.train = dataclasses.replace(config.train, workers=args.workers)
        if args.max_seconds is not None:
            config.train = dataclasses.replace(config.train, max_seconds=args.max_seconds)
        if args.filler is not None:
            config.data = dataclasses.replace(config.data, filler=args.filler)
        out = train_zoo_model(config, args.out or f"results/zoo/{config.name}", args.device)
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.exit(2, f"zoo: error: {err}\n")
    print(f"saved {out}")
    return 0


__all__ = [
    "EOS_ID", "ModelSpec", "PAD_ID", "VOCAB_SIZE", "ZooConfig", "build_model", "byte_tokenizer", "config_from_dict",
    "export_filler", "is_byte_tokenizer", "is_zoo_checkpoint", "load_config", "load_zoo_model", "main", "train_zoo_model", "zoo_config_of",
]

if __name__ == "__main__":
    sys.exit(main())
