"""`topklab eval`: task accuracy under Top-k decoding, one tidy row per sample x decoding configuration.

Each sample's prompt is prefilled ONCE with dense attention; its KV cache is deep-copied for every configuration,
which then decodes greedily token by token under its own Top-k attention (`topklab.decoding.topk_attention`,
prefill dense as in the study), recording recall@k, attention-mass recall and output error on the way. The first
answer token comes from the shared dense prefill. Hidden-state indexers (``source="hidden"``) need the prompt's
hidden states, so they prefill again inside their own context (same dense prefill, computed twice).

Output folder (columns: /work/notes/eval_schema.md, i.e. `COLUMNS` plus `EXTRA_COLUMNS`):
    cells/*.parquet     one file per (sample, run), written atomically; finished (sample, configuration) pairs
                        are skipped on re-runs, a killed run leaves no half-written file and redoes at most the
                        sample it was in; adding an indexer or a k later decodes only the new configurations
    fidelity/*.parquet  per step/layer/head recorder rows (``fidelity_detail``; for the samples decoded in that
                        run), recorder columns plus task, length, sample, indexer, k (its own count: ``k_keys``)
    results.parquet     all cells merged (rank 0, after every rank finished); `read_results` merges on demand
    config.json
``k`` is stored as a float (16.0 = 16 keys, 0.05 = 5% of the context; NaN for dense); the ``config`` column tells
an int from a float where that matters (k=1 key vs the ratio 1.0).

Scale-out without a launcher of our own: run the same command under ``torchrun --nproc-per-node N`` (or
``accelerate launch``). Each rank reads RANK / WORLD_SIZE / LOCAL_RANK, takes the samples ``rank::world`` of the
work list, runs on ``cuda:LOCAL_RANK`` when CUDA is present and writes its own cells; a gloo barrier lets rank 0
merge at the end. ``device_map="auto"`` spreads one model too large for a GPU over all visible GPUs (one process).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from topklab.decoding.hf import cache_keyword
from topklab.decoding.topk_attention import PER_CHOICES, check_count, check_k, topk_attention
from topklab.indexers import make as make_indexer
from topklab.io import digest, read_table, write_table, write_text
from topklab.models import DEFAULT_MODEL, load_model
from topklab.tasks.base import PromptCodec, Sample, Task, make_with_filler

log = logging.getLogger(__name__)

#: The columns of the eval_schema contract (extras follow them).
COLUMNS = (
    "task", "length", "sample", "seed", "model", "indexer", "k", "per", "score", "prediction", "answer",
    "context_tokens", "decode_steps", "recall", "mass_recall", "output_error", "rank",
)
EXTRA_COLUMNS = ("sinks", "window", "max_new_tokens", "seconds", "sample_key", "config")
DENSE = "dense"
GENERATED_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DecodeConfig:
    """One decoding configuration: dense attention, or an indexer at one k with its options."""

    indexer: str  # canonical indexer spec, or "dense"
    k: int | float | None = None
    per: str = ""
    sinks: int = 0
    window: int = 0
    record: bool = True
    hidden: bool = False  # the indexer scores hidden states (its prefill runs inside the Top-k context)

    @property
    def dense(self) -> bool:
        return self.indexer == DENSE

    @property
    def ident(self) -> str:
        """What the result depends on, as a stable string (the ``config`` column)."""
        if self.dense:
            return DENSE
        return f"{self.indexer}|k={self.k!r}|per={self.per}|sinks={self.sinks}|window={self.window}|record={self.record}"


def configurations(indexers: Sequence[str], ks: Sequence[int | float], per: str | None = None, sinks: int = 0,
                   window: int = 0, record: bool = True) -> list[DecodeConfig]:
    """``dense`` once, every other indexer spec at every k (specs made canonical, duplicates dropped)."""
    if per is not None and per not in PER_CHOICES:
        raise ValueError(f"per must be one of {', '.join(PER_CHOICES)}, got {per!r}")
    check_count("sinks", sinks), check_count("window", window)  # before any model loads
    out: list[DecodeConfig] = []
    for spec in indexers:
        if spec == DENSE:
            out.append(DecodeConfig(DENSE))
            continue
        indexer = make_indexer(spec).require_fitted()  # fails fast on a bad spec or an untrained learned indexer
        hidden = indexer.source == "hidden"
        resolved = per if per is not None else ("layer" if hidden else "head")
        if not ks:
            raise ValueError(f"indexer {spec!r} needs at least one k")
        for k in ks:
            out.append(DecodeConfig(indexer.spec, check_k(k), resolved, sinks, window, record, hidden))
    if not out:
        raise ValueError("no decoding configuration: give at least one indexer spec, or 'dense'")
    unique: dict[str, DecodeConfig] = {}
    for config in out:  # by ident: DecodeConfig(k=1) == DecodeConfig(k=1.0), yet one key is not the whole context
        unique.setdefault(config.ident, config)
    return list(unique.values())


@dataclass
class EvalConfig:
    model: str = DEFAULT_MODEL
    tasks: tuple[str, ...] = GENERATED_TASKS
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    samples: int = 10  # per task and length
    indexers: tuple[str, ...] = (DENSE, "exact")
    ks: tuple[int | float, ...] = (64,)
    per: str | None = None  # None: "head" ("layer" for hidden-state indexers)
    sinks: int = 0
    window: int = 0
    max_new_tokens: int | None = None  # None: each task's own answer budget
    seed: int = 0
    out: str = "results/eval"
    device: str | None = None  # None: cuda:LOCAL_RANK when CUDA is present, else cpu
    device_map: str | None = None  # "auto": spread the model over all visible GPUs
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    chat: bool | None = None  # None: use the tokenizer's chat template when it has one
    record: bool = True  # fidelity columns (recall, mass_recall, output_error)
    fidelity_detail: bool = False  # also write per step/layer/head rows to fidelity/
    filler: str | None = None  # haystack text: 'wiki', a .txt file or folder; None = a zoo model's own, else wiki

    def decode_configs(self) -> list[DecodeConfig]:
        return configurations(self.indexers, self.ks, self.per, self.sinks, self.window, self.record)


@dataclass(frozen=True)
class Shard:
    """This process's place in a torchrun / accelerate launch (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Shard":
        try:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            local = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError as err:
            raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
        return cls(rank, world, local)


@dataclass(frozen=True)
class WorkItem:
    task: Task
    length: int
    index: int
    key: str = ""  # the sample key: what its prompt and prefill depend on


def run_evaluation(config: EvalConfig, model=None, tokenizer=None, shard: Shard | None = None) -> pd.DataFrame:
    """Evaluate this rank's shard of the work, skipping finished cells; returns all results merged so far.

    ``model`` / ``tokenizer``: an already loaded model (e.g. a fine-tuned one) instead of loading
    ``config.model``, which then only names it in the results. ``tokenizer=None`` means byte-level tokens.
    """
    shard = shard or Shard.from_env()
    tasks = _tasks(config)
    configs = config.decode_configs()
    for length in config.lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"lengths must be positive ints (tokens), got {length!r}")
    if config.samples < 1:
        raise ValueError(f"samples must be >= 1, got {config.samples}")
    if config.max_new_tokens is not None and (isinstance(config.max_new_tokens, bool)
                                              or not isinstance(config.max_new_tokens, int) or config.max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an int >= 1 (or None: each task's own budget), got "
                         f"{config.max_new_tokens!r}")
    if config.device_map and shard.world > 1:
        raise ValueError("device_map spreads one model over all GPUs; run it as a single process, not under torchrun")
    device = _pick_device(config.device, shard) if model is None else _model_device(model)
    dtype = _pick_dtype(config.dtype, device) if model is None else next(model.parameters()).dtype
    out = Path(config.out)
    group = _init_distributed(shard)
    if shard.rank == 0:
        write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str), out / "config.json")

    work = [WorkItem(t, length, i) for t in tasks for length in config.lengths
            for i in range(min(config.samples, t.count or config.samples))]
    mine = [dataclasses.replace(w, key=_sample_key(config, w, dtype)) for w in work[shard.rank :: shard.world]]
    done = _finished(out / "cells")
    todo = [(w, [c for c in configs if c.ident not in done.get(w.key, ())]) for w in mine]
    todo = [(w, pending) for w, pending in todo if pending]
    log.info("rank %d/%d: %d of %d samples have work left (%d configurations each at most)", shard.rank, shard.world,
             len(todo), len(mine), len(configs))
    if todo:
        if model is None:
            model, tokenizer = load_eval_model(config.model, device, dtype, config.device_map)
        codec = PromptCodec(tokenizer, chat=config.chat, vocab_size=model.config.vocab_size)
        window = getattr(model.config, "max_position_embeddings", None)
        if window is not None and max(config.lengths) > window:
            raise ValueError(f"length {max(config.lengths)} exceeds {config.model}'s window of {window} tokens")
        first = {}  # fail on a length too short for a task now, not after hours of other work
        for item, _ in todo:
            first.setdefault((item.task.label, item.length), item)
        samples = {item.key: item.task.sample(codec, item.length, item.index, config.seed, config.max_new_tokens)
                   for item in first.values()}
        for item, pending in tqdm(todo, desc=f"eval rank {shard.rank}", unit="sample", position=shard.rank):
            sample = samples.pop(item.key, None) or item.task.sample(codec, item.length, item.index, config.seed,
                                                                  config.max_new_tokens)
            rows, details = evaluate_sample(model, codec, item.task, sample, pending, detail=config.fidelity_detail)
            frame = pd.DataFrame(rows).assign(model=config.model, rank=shard.rank, sample_key=item.key)
            name = f"{_slug(sample.task)}-L{item.length}-s{item.index}-{item.key[:12]}-{digest([c.ident for c in pending])[:8]}"
            if details:
                detail = pd.concat(details, ignore_index=True)
                write_table(detail.assign(model=config.model), out / "fidelity" / f"{name}.parquet")
            write_table(frame[[*COLUMNS, *EXTRA_COLUMNS]], out / "cells" / f"{name}.parquet")
    _barrier(group, shard)
    results = _this_run(read_results(out), {_sample_key(config, w, dtype) for w in work}, {c.ident for c in configs})
    if shard.rank == 0:
        write_table(results, out / "results.parquet")
    if group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return results


def evaluate_sample(model, codec: PromptCodec, task: Task, sample: Sample, configs: Sequence[DecodeConfig],
                    detail: bool = False) -> tuple[list[dict], list[pd.DataFrame]]:
    """Prefill ``sample`` once (dense) and decode it under every configuration: one row dict per configuration,
    plus the recorders' per step/layer/head frames when ``detail``."""
    ids = torch.tensor([sample.input_ids], device=_model_device(model))
    eos = codec.eos_ids() | _eos_ids(model)
    rows, details = [], []
    with torch.no_grad():
        logits, cache = prefill(model, ids)
        for config in configs:
            start = time.perf_counter()
            tokens, frame = decode(model, ids, logits, cache, config, sample.max_new_tokens, eos)
            answer_tokens = tokens[:-1] if tokens and tokens[-1] in eos else tokens
            prediction = codec.decode(answer_tokens)
            fidelity = {c: float(frame[c].mean()) if frame is not None and len(frame) else math.nan
                        for c in ("recall", "mass_recall", "output_error")}
            rows.append({
                "task": sample.task, "length": sample.length, "sample": sample.index, "seed": sample.seed,
                "indexer": config.indexer, "k": math.nan if config.k is None else float(config.k), "per": config.per,
                "score": float(task.score(prediction, sample.answers)), "prediction": prediction,
                "answer": sample.answer, "context_tokens": len(sample.input_ids), "decode_steps": len(tokens),
                **fidelity, "sinks": config.sinks, "window": config.window, "max_new_tokens": sample.max_new_tokens,
                "seconds": time.perf_counter() - start, "config": config.ident,
            })
            if detail and frame is not None and len(frame):
                details.append(frame.rename(columns={"k": "k_keys"}).assign(
                    task=sample.task, length=sample.length, sample=sample.index, indexer=config.indexer,
                    k=float(config.k), config=config.ident))
    return rows, details


def prefill(model, ids: torch.Tensor):
    """Dense forward pass over the prompt: (last position's logits [1, vocab], KV cache)."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], _cache_of(out)


def decode(model, ids: torch.Tensor, logits: torch.Tensor, cache, config: DecodeConfig, steps: int,
           eos: set[int]) -> tuple[list[int], pd.DataFrame | None]:
    """Greedy decoding of up to ``steps`` tokens from a prefilled (logits, cache), which are left untouched, under
    ``config``'s attention. Returns the tokens (ending with EOS if one came) and the recorder's frame."""
    with contextlib.ExitStack() as stack:
        handle = None
        if not config.dense:
            handle = stack.enter_context(topk_attention(model, config.indexer, k=config.k, per=config.per,
                                                        sinks=config.sinks, window=config.window, record=config.record))
        if config.hidden:
            logits, cache = prefill(model, ids)
        else:
            cache = copy.deepcopy(cache)
        tokens = greedy(model, logits, cache, ids.shape[1], steps, eos)
    frame = handle.recorder.frame() if handle is not None and handle.recorder is not None else None
    return tokens, frame


def greedy(model, logits: torch.Tensor, cache, prompt_len: int, steps: int, eos: set[int]) -> list[int]:
    """Argmax decoding one token at a time on ``cache`` (extended in place), as ``generate(do_sample=False)``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = logits.device
    token = logits.argmax(-1, keepdim=True)
    tokens: list[int] = []
    while True:
        tokens.append(int(token))
        if len(tokens) == steps or tokens[-1] in eos:
            return tokens
        mask = torch.ones(1, prompt_len + len(tokens), dtype=torch.long, device=device)
        out = model(input_ids=token.to(_model_device(model)), attention_mask=mask, use_cache=True,
                    **{cache_keyword(model): cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)


def read_results(out: str | Path) -> pd.DataFrame:
    """All rows written under ``out`` (every rank's cells, of every run into it), one per (sample, configuration);
    `run_evaluation` returns and writes only its own run's."""
    cells = sorted((Path(out) / "cells").glob("*.parquet"))
    if not cells:
        return pd.DataFrame({c: [] for c in (*COLUMNS, *EXTRA_COLUMNS)})
    frame = pd.concat([read_table(p) for p in cells], ignore_index=True)
    frame = frame.drop_duplicates(["sample_key", "config"], keep="first")
    return frame.sort_values(["task", "length", "sample", "indexer", "k"], kind="stable", ignore_index=True)


def _this_run(results: pd.DataFrame, sample_keys: set[str], idents: set[str]) -> pd.DataFrame:
    """The rows of this run's samples and configurations: a reused folder may hold cells of earlier settings (other
    samples, seeds, answer budgets or indexers), which stay on disk for a later run but are not this run's results."""
    mine = results["sample_key"].isin(sample_keys) & results["config"].isin(idents)
    if not mine.all():
        log.info("%d row(s) in the results folder belong to other settings; left out of this run's results",
                 int((~mine).sum()))
    return results[mine].reset_index(drop=True)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean score (and sample count) per task, length and configuration (``config``: k = 1 key and the ratio 1.0,
    or runs with other sinks or windows, stay apart)."""
    keys = ["task", "length", "indexer", "k", "per", "config"]
    grouped = results.groupby(keys, dropna=False, sort=False)
    summary = grouped.agg(samples=("score", "size"), score=("score", "mean"), recall=("recall", "mean"),
                          mass_recall=("mass_recall", "mean"))
    return summary.reset_index().sort_values(keys, kind="stable", ignore_index=True)


def load_eval_model(name: str, device: str, dtype: torch.dtype, device_map: str | None = None):
    """(model, tokenizer or None); ``device_map`` loads a Hugging Face folder / hub id across GPUs."""
    if device_map is None:
        model, tokenizer = load_model(name, dtype=dtype, device=device)
        return model.to(dtype).eval(), tokenizer
    if name == DEFAULT_MODEL or name.startswith("tiny-"):
        raise ValueError(f"{name!r} fits on one device; drop --device-map (it is for large Hugging Face checkpoints)")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        log.warning("no tokenizer in %s (%s); using byte-level tokens", name, err)
        tokenizer = None
    model.config.name_or_path = name
    return model.eval(), tokenizer


# -- helpers ---------------------------------------------------------------------------------------------------
def _tasks(config: EvalConfig) -> list[Task]:
    """The tasks, their haystacks in ``config.filler`` (a zoo checkpoint's training text by default: a model trained
    on one text is scored on the same kind of prompt)."""
    from topklab.training.topk_sft import default_filler  # training imports the tasks: import it when needed

    filler = default_filler(config.model, config.filler)
    return [make_with_filler(spec, filler) for spec in config.tasks]


def _sample_key(config: EvalConfig, item: WorkItem, dtype: torch.dtype) -> str:
    """Everything a sample's prompt and dense prefill depend on."""
    return digest([config.model, item.task.key(), item.length, item.index, config.seed, config.max_new_tokens,
                    config.chat, str(dtype)])


def _finished(cells: Path) -> dict[str, set[str]]:
    """sample_key -> configurations already written."""
    done: dict[str, set[str]] = {}
    for path in sorted(cells.glob("*.parquet")):
        frame = pd.read_parquet(path, columns=["sample_key", "config"])
        for key, ident in zip(frame["sample_key"], frame["config"]):
            done.setdefault(key, set()).add(ident)
    return done


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60] or "x"


def _pick_device(requested: str | None, shard: Shard) -> str:
    if requested:
        return requested
    if torch.cuda.is_available():
        torch.cuda.set_device(shard.local_rank)
        return f"cuda:{shard.local_rank}"
    return "cpu"


def _pick_dtype(requested: str | None, device: str) -> torch.dtype:
    if requested is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    return DTYPES[requested]


def _model_device(model) -> torch.device:
    """Where the inputs go (the embedding's device for a model spread with device_map)."""
    return model.get_input_embeddings().weight.device


def _eos_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _init_distributed(shard: Shard):
    """A gloo process group for the final barrier when launched by torchrun / accelerate (None when alone)."""
    if shard.world == 1:
        return None
    import torch.distributed as dist

    if not dist.is_available() or "MASTER_ADDR" not in os.environ:
        log.warning("WORLD_SIZE=%d without a torch.distributed rendezvous (MASTER_ADDR): ranks cannot wait for each "
                    "other, so results.parquet may miss other ranks' cells; read_results() merges them later",
                    shard.world)
        return None
    if dist.is_initialized():
        return None
    dist.init_process_group("gloo", rank=shard.rank, world_size=shard.world, timeout=timedelta(days=1))
    return dist.group.WORLD


def _barrier(group, shard: Shard) -> None:
    import torch.distributed as dist

    if shard.world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


__all__ = [
    "COLUMNS", "DENSE", "DecodeConfig", "EXTRA_COLUMNS", "EvalConfig", "GENERATED_TASKS", "Shard", "configurations",
    "decode", "evaluate_sample", "greedy", "load_eval_model", "prefill", "read_results", "run_evaluation",
    "summarize",
]
