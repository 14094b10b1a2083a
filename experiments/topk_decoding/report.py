"""Shared by the Top-k decoding (claim 1) and Top-k SFT (claim 2) experiments: evaluate a model on tasks under
dense and Top-k decoding, and summarise accuracy with confidence intervals.

Evaluation reuses `topklab.tasks.evaluate.evaluate_sample` (one dense prefill per sample, every decoding
configuration decoded from a copy of its cache) but builds the tasks itself, so that a task's parameters (e.g. the
haystack text a zoo model was trained on) can be set. Rows follow /work/notes/eval_schema.md plus ``arm`` (which
model variant) and are cached one file per (arm, sample), its name carrying a digest of everything the sample's rows
depend on (weights, task parameters, seed, answer budget): re-running skips finished work, other settings redo it.

Confidence intervals: a mean of 0/1 scores gets a Wilson 95% interval; a mean of partial scores (RULER's
string_match_all) a percentile bootstrap over samples; a paired difference between two configurations a
percentile bootstrap over the samples both saw (seeded). `changed_up` / `changed_down` count the samples whose
score rose / fell.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from topklab.io import digest, read_table, write_table, write_text
from topklab.tasks import PromptCodec, make_with_filler
from topklab.tasks.evaluate import COLUMNS, DecodeConfig, evaluate_sample
from topklab.training.reuse import checkpoint_identity

log = logging.getLogger(__name__)
Z95 = 1.959963984540054


def evaluate(model, tokenizer, arm: str, tasks, lengths: Sequence[int], samples: int, configs: Sequence[DecodeConfig],
             out: str | Path, seed: int = 0, max_new_tokens: int | None = None, model_key=None) -> pd.DataFrame:
    """Rows for every (task, length, sample) x configuration of one model variant ``arm`` (cached under ``out``).

    ``model_key`` identifies the weights in the cache key; by default the `checkpoint_identity` of the model's
    name_or_path (its folder and training.json: a re-fine-tuned arm, e.g. from another base, is evaluated anew)."""
    codec = PromptCodec(tokenizer, vocab_size=model.config.vocab_size)

    def rows_for(task, length, index, pending):
        sample = task.sample(codec, length, index, seed, max_new_tokens)
        rows, _ = evaluate_sample(model, codec, task, sample, pending)
        return pd.DataFrame(rows).assign(model=arm, arm=arm, rank=0)

    key = [_model_key(model, model_key), seed, max_new_tokens]
    frame = cached_cells(Path(out) / "cells", arm, key, tasks, lengths, samples, configs, rows_for, f"eval {arm}")
    return frame[[*COLUMNS, "arm", "config"]]


def evaluate_teacher_forced(model, tokenizer, arm: str, tasks, lengths: Sequence[int], samples: int,
                            configs: Sequence[DecodeConfig], out: str | Path, seed: int = 0,
                            max_new_tokens: int | None = None, model_key=None) -> pd.DataFrame:
    """Teacher-forced Top-k decoding: per sample and configuration, the reference answer's mean token NLL
    (``nll``), the share of its tokens that are the argmax (``token_accuracy``) and whether all are (``exact``).

    One forward pass over prompt + answer + EOS, dense on the prompt and exact Top-k on the answer rows
    (`topk_training_attention(dense_prefix=...)`), equals step-by-step Top-k decoding fed the reference (tested), so
    a small accuracy effect shows up as a likelihood shift without sampling noise from greedy decoding. Cached as
    `evaluate` caches (``model_key`` likewise).
    """
    from topklab.decoding.topk_training_attention import topk_training_attention
    from topklab.training.topk_sft import answer_text, special_ids

    codec = PromptCodec(tokenizer, vocab_size=model.config.vocab_size)
    eos, _ = special_ids(model, tokenizer)
    device = next(model.parameters()).device

    def rows_for(task, length, index, pending):
        sample = task.sample(codec, length, index, seed, max_new_tokens)
        answer = codec.encode(answer_text(sample.answers)) + [eos]
        prompt = len(sample.input_ids)
        ids = torch.tensor([list(sample.input_ids) + answer], device=device)
        target = torch.tensor(answer, device=device)
        rows = []
        for config in pending:
            if not config.dense and config.indexer != "exact":
                raise ValueError(f"teacher-forced scoring runs exact Top-k only, not {config.indexer!r}")
            attention = (contextlib.nullcontext() if config.dense else
                         topk_training_attention(model, config.k, per=config.per, sinks=config.sinks,
                                                 window=config.window, dense_prefix=prompt))
            with torch.no_grad(), attention:
                logits = model(input_ids=ids).logits[0, prompt - 1 : -1].float()
            hits = logits.argmax(-1) == target
            rows.append({"task": task.label, "length": length, "sample": index, "seed": seed, "model": arm,
                         "arm": arm, "indexer": config.indexer, "per": config.per, "config": config.ident,
                         "k": math.nan if config.k is None else float(config.k),
                         "nll": torch.nn.functional.cross_entropy(logits, target).item(),
                         "token_accuracy": hits.float().mean().item(), "exact": float(hits.all()),
                         "context_tokens": prompt})
        return pd.DataFrame(rows)

    key = [_model_key(model, model_key), seed, max_new_tokens]
    return cached_cells(Path(out) / "teacher_forced", arm, key, tasks, lengths, samples, configs, rows_for,
                        f"teacher-forced {arm}")


def cached_cells(folder: Path, arm: str, key: list, tasks, lengths: Sequence[int], samples: int,
                 configs: Sequence[DecodeConfig], rows_for, desc: str) -> pd.DataFrame:
    """Rows per (task, length, sample) x configuration, one file per sample named by a digest of ``key`` and the
    sample's task, length and index (everything its rows depend on), so other settings never reuse them;
    ``rows_for(task, length, index, pending)`` computes the configurations a file still lacks."""
    frames = []
    work = [(task, length, index) for task in tasks for length in lengths for index in range(samples)]
    for task, length, index in tqdm(work, desc=desc, unit="sample"):
        name = f"{arm}-{task.label}-L{length}-s{index}-{digest([*key, task.key(), length, index])[:12]}"
        path = folder / f"{name}.parquet"
        done = read_table(path) if path.is_file() else pd.DataFrame({"config": []})
        pending = [c for c in configs if c.ident not in set(done["config"])]
        if pending:
            done = pd.concat([done, rows_for(task, length, index, pending)], ignore_index=True)
            write_table(done, path)
        frames.append(done[done["config"].isin({c.ident for c in configs})])
    return pd.concat(frames, ignore_index=True)


def _model_key(model, given) -> list:
    """The weights' identity and dtype: what a sample's rows depend on besides the sample itself."""
    weights = given if given is not None else checkpoint_identity(getattr(model.config, "name_or_path", ""))
    return [weights, str(next(model.parameters()).dtype)]


def build_tasks(names: Sequence[str], filler: str | None):
    """Tasks by name; ``filler`` sets the haystack text of those that have one (a zoo model's training text)."""
    return [make_with_filler(name, filler or None) for name in names]


def setting(frame: pd.DataFrame) -> pd.Series:
    """A readable name per row: "dense" or "exact k=0.02"."""
    return np.where(frame["indexer"] == "dense", "dense",
                    frame["indexer"] + " k=" + frame["k"].map(lambda k: f"{k:g}" if pd.notna(k) else ""))


def wilson(successes: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2)) / (1 + Z95**2 / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    return low, 1.0 if successes == n else min(1.0, centre + half)


def bootstrap_mean(values: np.ndarray, seed: int = 0, resamples: int = 5000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    return tuple(np.percentile(values[draws].mean(1), [2.5, 97.5]))


def interval(scores: np.ndarray, seed: int = 0) -> tuple[float, float, str]:
    """(low, high, method) of the mean score: Wilson for 0/1 scores, bootstrap for partial credit."""
    scores = np.asarray(scores, dtype=float)
    if np.isin(scores, (0.0, 1.0)).all():
        return (*wilson(scores.sum(), len(scores)), "wilson")
    return (*bootstrap_mean(scores, seed), "bootstrap")


def accuracy_table(results: pd.DataFrame, by: Sequence[str], seed: int = 0) -> pd.DataFrame:
    """Mean score per group with its 95% interval and sample count (plus mean recall / mass recall)."""
    rows = []
    for key, group in results.groupby(list(by), sort=False, dropna=False):
        low, high, method = interval(group["score"].to_numpy(), seed)
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "n": len(group),
                     "score": group["score"].mean(), "low": low, "high": high, "ci": method,
                     "recall": group["recall"].mean(), "mass_recall": group["mass_recall"].mean(),
                     "keys": keys_attended(group)})
    return pd.DataFrame(rows)


def keys_attended(group: pd.DataFrame) -> float:
    """Keys per query of a group's k: a count as given, a ratio times the mean prompt length (NaN for dense)."""
    k = group["k"].dropna()
    if k.empty:
        return math.nan
    k = float(k.iloc[0])
    return k if k >= 1 else k * float(group["context_tokens"].mean())


def parse_k(text: str) -> int | float:
    """"64" -> a key count, "0.02" -> a ratio of the context."""
    return int(text) if text.isdigit() else float(text)


def accuracy_by_task(results: pd.DataFrame, by: Sequence[str], seed: int = 0) -> pd.DataFrame:
    """`accuracy_table` per task, then pooled over the tasks (task "all")."""
    return pd.concat([accuracy_table(results, by, seed), accuracy_table(results.assign(task="all"), by, seed)],
                     ignore_index=True)


def per_scope(results: pd.DataFrame, difference) -> pd.DataFrame:
    """``difference(frame)`` over all tasks pooled (task "all") and then each task alone."""
    scopes = [("all", results), *((task, results[results["task"] == task]) for task in dict.fromkeys(results["task"]))]
    return pd.concat([difference(frame).assign(task=scope) for scope, frame in scopes], ignore_index=True)


def write_summary(out: Path, title: str, table: pd.DataFrame, diffs: pd.DataFrame, *, name: str, diff_label: str,
                  diffs_file: str, headings: tuple[str, str]) -> str:
    """summary.csv, ``diffs_file``, accuracy_vs_k.png (one line per ``name`` value) and summary.md; returns the
    markdown."""
    write_table(table, out / "summary.csv")
    write_table(diffs, out / diffs_file)
    plot_accuracy_vs_k(table.rename(columns={name: "model"}), out / "accuracy_vs_k.png", hue="model", title=title)
    shown = table.assign(**{"score [95% CI]": with_interval(table)})[[name, "task", "setting", "n", "score [95% CI]",
                                                                      "ci", "recall", "mass_recall"]]
    paired = diffs.assign(**{diff_label: with_interval(diffs, "difference")})[
        ["setting", "task", "n", diff_label, "changed_up", "changed_down"]]
    text = f"## {title}\n\n{headings[0]}\n\n{markdown(shown)}\n\n{headings[1]}\n\n{markdown(paired)}\n"
    write_text(text, out / "summary.md")
    return text


def paired_difference(results: pd.DataFrame, column: str, a: str, b: str, by: Sequence[str] = (), seed: int = 0,
                      unit: Sequence[str] = ("task", "length", "sample"), value: str = "score") -> pd.DataFrame:
    """Mean of value[a] - value[b] over the samples both have (``column`` tells a from b), per group ``by``."""
    rows = []
    groups = results.groupby(list(by), sort=False) if by else [((), results)]
    for key, group in groups:
        wide = group.pivot_table(index=list(unit), columns=column, values=value, aggfunc="mean")
        if a not in wide or b not in wide:
            continue
        diff = (wide[a] - wide[b]).dropna().to_numpy()
        low, high = bootstrap_mean(diff, seed)
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), "n": len(diff), "difference": diff.mean() if len(diff) else math.nan,
                     "low": low, "high": high, "changed_up": int((diff > 0).sum()),
                     "changed_down": int((diff < 0).sum())})
    return pd.DataFrame(rows)


def plot_accuracy_vs_k(table: pd.DataFrame, path: str | Path, hue: str, title: str, value: str = "score",
                       ylim: tuple[float, float] | None = (-0.03, 1.03)) -> Path:
    """``value`` (default: score) vs k (log axis) with 95% intervals, one line per ``hue`` value and one panel per
    task; the dense configuration drawn as a dashed line of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(table["task"]))
    figure, axes = plt.subplots(1, len(tasks), figsize=(max(5.5, 3.2 * len(tasks)), 3.2), sharey=True, squeeze=False)
    colours = dict(zip(dict.fromkeys(table[hue]), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for axis, task in zip(axes[0], tasks):
        rows = table[table["task"] == task]
        for name, colour in colours.items():
            line = rows[(rows[hue] == name) & (rows["indexer"] != "dense")].sort_values("keys")
            if len(line):
                below, above = (line[value] - line["low"]).clip(lower=0), (line["high"] - line[value]).clip(lower=0)
                axis.errorbar(line["keys"], line[value], yerr=[below, above],
                              marker="o", capsize=3, color=colour, label=f"{name}: Top-k")
            dense = rows[(rows[hue] == name) & (rows["indexer"] == "dense")]
            if len(dense):
                axis.axhline(dense[value].iloc[0], color=colour, linestyle="--", linewidth=1, label=f"{name}: dense")
        axis.set_xscale("log")
        if ylim is not None:
            axis.set_ylim(*ylim)
        axis.set_title(f"{task} (n={int(rows['n'].max())} per point)", fontsize=9)
        axis.set_xlabel("k (keys per query)")  # a ratio k is drawn at ratio x mean prompt length
    axes[0][0].set_ylabel(value)
    axes[0][-1].legend(fontsize=7, loc="best")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub table; floats rounded."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def with_interval(table: pd.DataFrame, value: str = "score") -> pd.Series:
    """"0.800 [0.490, 0.943]" strings."""
    return table.apply(lambda r: f"{r[value]:.3f} [{r['low']:.3f}, {r['high']:.3f}]", axis=1)


def set_threads(threads: int | None) -> None:
    """Fewer torch threads than cores is faster on a shared machine (oversubscription)."""
    if threads:
        torch.set_num_threads(threads)


__all__ = [
    "accuracy_table", "bootstrap_mean", "build_tasks", "cached_cells", "evaluate", "evaluate_teacher_forced", "interval", "markdown", "paired_difference", "plot_accuracy_vs_k",
    "set_threads", "setting", "wilson", "with_interval",
]
