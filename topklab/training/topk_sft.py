"""Native Top-k fine-tuning (the study's Top-k SFT): train with Top-k attention in the forward pass.

Every query position attends to its k best causal keys (exact Top-k, a count or a ratio of its context such as
1-5%), softmax renormalised over them, gradients through the selected keys only
(`topklab.decoding.topk_training_attention`). Training and Top-k decoding then see the same attention: the study
reports this consistency makes Top-k decoding clearly better. With ``topk=None`` the same loop trains densely: the
control arm of that comparison, and how the model zoo (`topklab.training.zoo`) pre-trains.

The data are the synthetic tasks of `topklab.tasks`: each sequence is a task prompt followed by its answer and EOS,
drawn with a data seed other than the one `topklab eval` scores (0), so training never sees a test sample.

    python -m topklab.training.topk_sft --model results/zoo/zoo-s --k 0.02 --steps 300 --out ft

Works for the zoo models and any Hugging Face Llama-style model, including the embedded SmolLM2 (``--model
smollm2``: chat-templated prompts, as `topklab eval` reads them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from topklab.decoding.topk_attention import PER_CHOICES, check_k
from topklab.decoding.topk_training_attention import TopkSpec, topk_training_attention
from topklab.io import atomic_folder, write_table, write_text
from topklab.tasks import PromptCodec, make_with_filler

log = logging.getLogger(__name__)

LOSS_ON = ("answer", "all")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EVAL_SEED = 0  # the seed `topklab eval` draws its samples with: never trained on


@dataclass
class TaskData:
    """Training sequences from the synthetic tasks: each step draws one length and ``batch_size`` samples."""

    tasks: tuple[str, ...] = ("passkey", "niah_single")
    lengths: tuple[int, ...] = (512, 1024)
    loss_on: str = "answer"  # "answer": the answer and EOS only (SFT); "all": every token (pre-training)
    answer_weight: float = 1.0  # with loss_on="all": the loss weight of answer tokens relative to prompt tokens
    data_seed: int = 1
    filler: str | None = None  # text for the haystacks: None = each task's default ("wiki"); a .txt file or folder

    def __post_init__(self):
        self.tasks, self.lengths = tuple(self.tasks), tuple(self.lengths)
        if not self.tasks:
            raise ValueError("data.tasks is empty: name at least one task, e.g. ['passkey']")
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in self.lengths):
            raise ValueError(f"data.lengths must be positive ints (tokens), got {list(self.lengths)}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"data.loss_on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        if not self.answer_weight > 0:
            raise ValueError(f"data.answer_weight must be > 0, got {self.answer_weight}")
        if self.data_seed == EVAL_SEED:
            raise ValueError(f"data.data_seed = {EVAL_SEED} draws the very samples `topklab eval` scores; pick another")
        for spec in self.tasks:
            self.make_task(spec)  # unknown task names fail here, not mid-training

    def make_task(self, spec: str):
        """The task ``spec``, with its haystack text set to ``filler`` when it has one."""
        return make_with_filler(spec, self.filler)


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-4
    warmup: int = 20  # linear warm-up steps, then cosine decay to lr * final_lr_ratio
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # "bfloat16": autocast on CUDA (weights stay fp32)
    topk: TopkSpec | None = None  # None: dense attention
    log_every: int = 10
    workers: int = 0  # DataLoader processes building batches (0: the training process); results do not depend on it
    max_seconds: float | None = None  # a safety net for time-limited machines: stop early (logged and recorded)

    def __post_init__(self):
        if isinstance(self.topk, dict):
            self.topk = TopkSpec(**self.topk)
        if self.workers < 0:
            raise ValueError(f"train.workers must be >= 0, got {self.workers}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.warmup < 0 or not 0 <= self.final_lr_ratio <= 1:
            raise ValueError("train.warmup must be >= 0 and train.final_lr_ratio in [0, 1]")
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def answer_text(answers: Sequence[str]) -> str:
    """What the model is taught to say after the prompt's answer prefix: " a, b and c." as a reply would."""
    if len(answers) == 1:
        return f" {answers[0]}."
    return " " + ", ".join(answers[:-1]) + f" and {answers[-1]}."


class TaskBatches(torch.utils.data.Dataset):
    """Training batch number ``step``: ``input_ids / attention_mask / labels / weights / answer [B, T]``.

    A batch is a pure function of the seeds and ``step`` (its length and tasks come from ``seed``, its samples from
    ``data.data_seed``), so any number of DataLoader workers yields the same sequence of batches. Rows are a task
    prompt, the answer and EOS, right-padded; ``labels`` is -100 where there is no loss, ``weights`` weighs each
    token's loss (answer tokens by ``data.answer_weight`` when the loss covers every token) and ``answer`` marks the
    answer and EOS tokens. The answer is never cut to the task's answer budget (byte-level answers can exceed it, e.g.
    vt's five names), so a row may run a few tokens past its length.
    """

    def __init__(self, data: TaskData, codec: PromptCodec, batch_size: int, eos_id: int, pad_id: int, seed: int,
                 steps: int):
        self.data, self.codec, self.batch_size = data, codec, batch_size
        self.eos_id, self.pad_id, self.seed, self.steps = eos_id, pad_id, seed, steps
        self.tasks = [data.make_task(spec) for spec in data.tasks]

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        choose = random.Random(f"{self.seed}|{step}")
        length = choose.choice(self.data.lengths)
        rows = []
        for slot in range(self.batch_size):
            first = (step * self.batch_size + slot) * _ATTEMPTS
            sample = _draw(choose.choice(self.tasks), self.codec, length, first, self.data.data_seed)
            answer = self.codec.encode(answer_text(sample.answers)) + [self.eos_id]  # whole, even past the budget
            rows.append((list(sample.input_ids), answer))
        width = max(len(prompt) + len(answer) for prompt, answer in rows)
        shape = (self.batch_size, width)
        batch = {"input_ids": torch.full(shape, self.pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros(shape, dtype=torch.long),
                 "labels": torch.full(shape, -100, dtype=torch.long),
                 "weights": torch.zeros(shape),
                 "answer": torch.zeros(shape, dtype=torch.bool)}
        for row, (prompt, answer) in enumerate(rows):
            n, end = len(prompt), len(prompt) + len(answer)
            batch["input_ids"][row, :end] = torch.tensor(prompt + answer)
            batch["attention_mask"][row, :end] = 1
            batch["answer"][row, n:end] = True
            first = 0 if self.data.loss_on == "all" else n
            batch["labels"][row, first:end] = batch["input_ids"][row, first:end]
            batch["weights"][row, first:n] = 1.0
            batch["weights"][row, n:end] = self.data.answer_weight if self.data.loss_on == "all" else 1.0
        return batch


_ATTEMPTS = 64  # samples tried per batch slot (a long filler sentence can make a sample too long for its length)


def _draw(task, codec: PromptCodec, length: int, first: int, seed: int):
    """The first sample of ``task`` from index ``first`` on that fits ``length``."""
    for index in range(first, first + _ATTEMPTS):
        try:
            return task.sample(codec, length, index, seed)
        except ValueError as err:
            last = err
    raise ValueError(f"{_ATTEMPTS} samples in a row of task {task.label!r} do not fit length {length}: {last}")


def task_batches(data: TaskData, codec: PromptCodec, batch_size: int, eos_id: int, pad_id: int, seed: int,
                 steps: int = 1 << 40, workers: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of `TaskBatches` in step order, built by ``workers`` DataLoader processes (0: in this one)."""
    dataset = TaskBatches(data, codec, batch_size, eos_id, pad_id, seed, steps)
    if workers == 0:
        return (dataset[step] for step in range(steps))
    dataset[0]  # reads the filler text once, before the workers start
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4))


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * final_lr_ratio`` at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (config.final_lr_ratio + (1 - config.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], config: TrainConfig,
          desc: str = "train") -> pd.DataFrame:
    """AdamW on the weighted next-token loss for ``config.steps`` steps, with Top-k attention when ``config.topk``
    is set. ``batches`` as `TaskBatches` makes them (``weights`` and ``answer`` are optional).

    Returns one row per step: step, loss, answer_loss (mean over answer tokens), lr, tokens (with loss), seconds.
    """
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    autocast = (torch.autocast("cuda", dtype=DTYPES[config.dtype])
                if device.type == "cuda" and config.dtype != "float32" else contextlib.nullcontext())
    attention = (topk_training_attention(model, **dataclasses.asdict(config.topk))
                 if config.topk is not None else contextlib.nullcontext())
    rows = []
    start = time.perf_counter()
    model.train()
    with attention:
        bar = tqdm(range(config.steps), desc=desc, leave=False)
        for step in bar:
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = {name: tensor.to(device) for name, tensor in next(batches).items()}
            with autocast:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            loss, answer_loss = token_loss(logits, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower train.lr or use float32")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            rows.append({"step": step, "loss": loss.item(), "answer_loss": answer_loss, "lr": lr,
                         "tokens": int((batch["labels"] != -100).sum()), "seconds": time.perf_counter() - start})
            if config.max_seconds is not None and rows[-1]["seconds"] > config.max_seconds and step < config.steps - 1:
                log.warning("%s: stopping after step %d of %d, past max_seconds = %.0f", desc, step + 1, config.steps,
                            config.max_seconds)
                break
            if step % config.log_every == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")
                log.info("%s step %d/%d: loss %.4f, answer loss %.4f, lr %.2e, %.0f s", desc, step, config.steps,
                         rows[-1]["loss"], answer_loss, lr, rows[-1]["seconds"])
    model.eval()
    return pd.DataFrame(rows)


def token_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(weighted mean next-token cross-entropy, its plain mean over answer tokens as a float; NaN without any)."""
    targets = batch["labels"][:, 1:]
    has_loss = targets != -100
    weights = batch["weights"][:, 1:] if "weights" in batch else has_loss.float()
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0),
                                                  reduction="none") * has_loss
    loss = (per_token * weights).sum() / weights.sum().clamp_min(1e-9)
    answer = batch["answer"][:, 1:] & has_loss if "answer" in batch else has_loss
    answer_loss = float(per_token.detach()[answer].mean()) if answer.any() else math.nan
    return loss, answer_loss


def special_ids(model, tokenizer) -> tuple[int, int]:
    """(eos, pad) token ids: the tokenizer's, else the model config's (byte-level zoo models)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = model.generation_config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    if eos is None:
        raise ValueError(f"{type(model).__name__} has no EOS token id (tokenizer or generation_config); cannot mark "
                         "where an answer ends")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    return int(eos), int(eos if pad is None else pad)


def save_checkpoint(model, tokenizer, out: str | Path, meta: dict, log_frame: pd.DataFrame | None = None,
                    files: dict[str, str] | None = None) -> Path:
    """A Hugging Face folder: config.json + model.safetensors (+ tokenizer files) + ``meta`` as training.json (+
    ``files``, name -> text). Written whole or not at all (`atomic_folder`): a later run may trust what it finds;
    ``out`` must be new, empty or an earlier checkpoint (which is replaced)."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if log_frame is not None:
            write_table(log_frame, folder / "train_log.csv")
        for name, text in (files or {}).items():
            write_text(text, folder / name)
        write_text(json.dumps(meta, indent=2, default=str), folder / "training.json")

    return atomic_folder(out, write, marker="training.json")


def finetune(model, tokenizer, data: TaskData, config: TrainConfig, out: str | Path | None = None,
             desc: str | None = None) -> pd.DataFrame:
    """Fine-tune ``model`` in place on ``data`` (Top-k when ``config.topk`` is set); save to ``out`` if given."""
    from topklab.training.zoo import CONFIG_FILE, is_byte_tokenizer

    # a zoo model's tokenizer gives the tasks' plain byte ids: encode them directly (30x faster sample building)
    codec = PromptCodec(None if is_byte_tokenizer(tokenizer) else tokenizer, vocab_size=model.config.vocab_size)
    eos, pad = special_ids(model, tokenizer)
    batches = task_batches(data, codec, config.batch_size, eos, pad, config.seed, config.steps, config.workers)
    label = desc or ("topk-sft k=" + repr(config.topk.k) if config.topk else "dense-sft")
    frame = train(model, batches, config, desc=label)
    if out is not None:
        meta = {"kind": "topk_sft" if config.topk else "dense_sft", "base": getattr(model.config, "name_or_path", ""),
                "data": dataclasses.asdict(data), "train": dataclasses.asdict(config), "steps_done": len(frame),
                "seconds": float(frame["seconds"].iloc[-1]), "device": str(next(model.parameters()).device)}
        base = Path(getattr(model.config, "name_or_path", "") or ".")
        if (base / "training.json").is_file():
            meta["base_training"] = json.loads((base / "training.json").read_text())
        zoo = base / CONFIG_FILE  # a zoo model stays a zoo model: keep its config
        save_checkpoint(model, tokenizer, out, meta, frame, {CONFIG_FILE: zoo.read_text()} if zoo.is_file() else None)
    return frame


def load_trainable(name: str, device: str):
    """(model, tokenizer) in fp32 for training: a zoo checkpoint, ``smollm2`` or any HF folder."""
    from topklab.models import load_model
    from topklab.training.zoo import is_zoo_checkpoint, load_zoo_model

    if is_zoo_checkpoint(name):
        model, tokenizer = load_zoo_model(name, device=device)
    else:
        model, tokenizer = load_model(name, dtype=torch.float32, device=device)
    model.config.name_or_path = name
    return model, tokenizer


def _parse_k(text: str) -> int | float:
    value = float(text) if any(c in text for c in ".eE") else int(text)
    return check_k(value)


def _zoo_data(model: str) -> TaskData | None:
    from topklab.training.zoo import is_zoo_checkpoint, zoo_config_of

    return zoo_config_of(model).data if is_zoo_checkpoint(model) else None


def default_tasks(model: str, given: str | None) -> tuple[str, ...]:
    """``given``, else the tasks a zoo base was trained on, else `TaskData`'s default."""
    if given:
        return tuple(given.split(","))
    base = _zoo_data(model)
    return base.tasks if base is not None else TaskData().tasks


def default_filler(model: str, given: str | None) -> str | None:
    """``given`` ('wiki' = the tasks' default), else the text a zoo base was trained on, else the default."""
    if given is not None:
        return None if given == "wiki" else given
    base = _zoo_data(model)
    return base.filler if base is not None else None


def build_parser() -> argparse.ArgumentParser:
    d, t = TaskData(), TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m topklab.training.topk_sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="zoo checkpoint folder, 'smollm2' or a HF folder")
    parser.add_argument("--k", type=_parse_k, help="Top-k per query: a count (32) or a ratio (0.02); omit with --dense")
    parser.add_argument("--dense", action="store_true", help="fine-tune with dense attention (the control arm)")
    parser.add_argument("--per", choices=PER_CHOICES, default="head")
    parser.add_argument("--sinks", type=int, default=0)
    parser.add_argument("--window", type=int, default=0)
    parser.add_argument("--tasks", help=f"comma-separated task names (default: a zoo base's training tasks, else "
                                        f"{','.join(d.tasks)})")
    parser.add_argument("--lengths", default=",".join(map(str, d.lengths)), help="comma-separated token lengths")
    parser.add_argument("--loss-on", choices=LOSS_ON, default=d.loss_on)
    parser.add_argument("--data-seed", type=int, default=d.data_seed)
    parser.add_argument("--filler", help="haystack text: 'wiki', a .txt file or folder (default: a zoo base's "
                                         "training text, else wiki)")
    for name in ("steps", "batch_size", "warmup", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(t, name))
    for name in ("lr", "weight_decay"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(t, name))
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes building batches")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop early past this many seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="folder for the fine-tuned checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.dense == (args.k is not None):
        parser.error("give exactly one of --k (Top-k fine-tuning) and --dense (the dense control)")
    try:
        topk = None if args.dense else TopkSpec(args.k, args.per, args.sinks, args.window)
        data = TaskData(default_tasks(args.model, args.tasks), tuple(int(n) for n in args.lengths.split(",")),
                        args.loss_on, data_seed=args.data_seed, filler=default_filler(args.model, args.filler))
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                             weight_decay=args.weight_decay, seed=args.seed, dtype=args.dtype, topk=topk,
                             workers=args.workers, max_seconds=args.max_seconds)
        torch.manual_seed(args.seed)
        model, tokenizer = load_trainable(args.model, args.device)
        frame = finetune(model, tokenizer, data, config, args.out)
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.exit(2, f"topk_sft: error: {err}\n")
    first, last = frame["loss"].head(10).mean(), frame["loss"].tail(10).mean()
    print(f"loss {first:.4f} -> {last:.4f} over {len(frame)} steps ({frame['seconds'].iloc[-1]:.0f} s); saved to {args.out}")
    return 0


__all__ = [
    "LOSS_ON", "TaskBatches", "TaskData", "TopkSpec", "TrainConfig", "answer_text", "default_filler", "default_tasks",
    "finetune", "learning_rate", "load_trainable", "save_checkpoint", "special_ids", "task_batches", "token_loss", "train",
]

if __name__ == "__main__":
    sys.exit(main())
