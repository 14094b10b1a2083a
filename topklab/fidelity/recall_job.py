"""`topklab recall`: capture real attention, replay it through indexers, write a tidy table, a figure and a summary.

The output folder is a cache: traces are reused while they verify, each indexer's results are one atomically
written cell keyed by everything it depends on, so re-running reuses finished work and a killed run only redoes
the cell it was in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from topklab.fidelity.evaluate import evaluate_spec
from topklab.fidelity.traces import TraceError, TraceFile, save_trace
from topklab.indexers import default_specs, make
from topklab.io import digest, read_table, write_table, write_text
from topklab.models import DEFAULT_MODEL

log = logging.getLogger(__name__)


@dataclass
class RecallConfig:
    model: str = DEFAULT_MODEL
    text: str = "wiki"
    lengths: tuple[int, ...] = (2048, 3072, 4096)  # one evaluated document per length
    decode: int = 24  # the last `decode` positions of each document are the (teacher-forced) decode steps
    fit_texts: int = 1  # extra documents, held out, that trainable indexers are fitted on
    fit_length: int = 2048
    indexers: tuple[str, ...] = ()  # empty: every registered family's examples
    ks: tuple[int, ...] = (16, 64, 256)
    layers: str = "spread:6"
    out: str = "results/recall"
    device: str = "cpu"
    seed: int = 0

    def specs(self) -> list[str]:
        specs = list(self.indexers) or default_specs()
        for spec in specs:
            make(spec)  # fail fast on a bad spec, before any model is loaded
        return specs


@dataclass
class RecallOutputs:
    results: pd.DataFrame
    summary: pd.DataFrame
    files: dict[str, Path] = field(default_factory=dict)


def run_recall(config: RecallConfig) -> RecallOutputs:
    specs = config.specs()
    if config.decode < 1:
        raise ValueError(f"decode must be >= 1 (the number of decode positions per document), got {config.decode}")
    if max(config.ks) >= min(config.lengths) - config.decode:
        raise ValueError(f"k = {max(config.ks)} is too large for documents of {min(config.lengths)} tokens")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(dataclasses.asdict(config), indent=2), out / "config.json")
    traces, fit_traces = _traces(config, out / "traces", need_fit=any(make(s).trainable for s in specs))
    frames = []
    for spec in tqdm(specs, desc="indexers", unit="indexer"):
        cell = out / "cells" / f"{_slug(spec)}-{_cell_key(spec, config, traces, fit_traces)}.parquet"
        if cell.is_file():
            log.info("reusing %s", cell.name)
            frames.append(read_table(cell))
            continue
        frame = evaluate_spec(spec, traces, config.ks, traces[0].layers, fit_traces, config.device)
        frame.insert(0, "model", config.model)
        write_table(frame, cell)
        frames.append(frame)
    results = pd.concat(frames, ignore_index=True)
    summary = summarize(results)
    files = {
        "results": write_table(results, out / "results.parquet"),
        "summary": write_table(summary, out / "summary.csv"),
    }
    from topklab.analysis.plots import recall_vs_k

    files["figure"] = recall_vs_k(results, out / "recall.png", title=f"{config.model}: indexer fidelity on real attention")
    return RecallOutputs(results, summary, files)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean fidelity and cost per indexer and k (over layers, heads, positions and documents)."""
    cols = ["recall", "mass_recall", "output_error", "bytes_read", "keys_scored", "search_us"]
    summary = results.groupby(["indexer", "k"], as_index=False, sort=False)[cols].mean()
    summary.insert(2, "rows", results.groupby(["indexer", "k"], sort=False).size().to_numpy())
    return summary


def format_summary(summary: pd.DataFrame) -> str:
    """recall@k / mass recall per indexer (rows) and k (columns), plus bytes read per query relative to exact."""
    cell = summary.assign(v=summary["recall"].map("{:.3f}".format) + " / " + summary["mass_recall"].map("{:.3f}".format))
    table = cell.pivot(index="indexer", columns="k", values="v")
    table.columns = [f"k={k}" for k in table.columns]
    exact_bytes = summary.loc[summary["indexer"] == "exact", "bytes_read"]
    reference = float(exact_bytes.mean()) if len(exact_bytes) else float(summary["bytes_read"].max())
    table["bytes/query vs exact"] = (summary.groupby("indexer")["bytes_read"].mean() / reference).map("{:.3f}".format)
    order = list(dict.fromkeys(summary["indexer"]))
    return "recall@k / attention-mass recall (mean over layers, heads, decode positions, documents)\n" + \
        table.loc[order].to_string()


def _traces(config: RecallConfig, folder: Path, need_fit: bool) -> tuple[list[TraceFile], list[TraceFile]]:
    """Capture (or reuse) one trace per evaluated document and per held-out fitting document."""
    from topklab.text import load_texts

    docs = load_texts(config.text)
    n_fit = config.fit_texts if need_fit else 0
    plan = [(f"eval{i}", length, config.decode) for i, length in enumerate(config.lengths)]
    plan += [(f"fit{i}", config.fit_length, 1) for i in range(n_fit)]
    if len(docs) < len(plan):
        raise ValueError(f"text source {config.text!r} has {len(docs)} document(s); {len(plan)} are needed")
    model = tokenizer = layers = None
    eval_traces, fit_traces = [], []
    for (role, length, decode), doc in tqdm(list(zip(plan, docs)), desc="traces", unit="doc"):
        info = {"model": config.model, "title": doc.title, "text": config.text}
        path = folder / _trace_name(role, info, doc.text, length, decode, config.layers)
        trace = _reuse(path, info)
        if trace is None:
            if model is None:
                from topklab.decoding.capture import resolve_layers
                from topklab.models import load_model

                model, tokenizer = load_model(config.model, device=config.device)
                layers = resolve_layers(model, config.layers)
            trace = _capture(model, tokenizer, doc, length, decode, layers, path, config, info)
        (eval_traces if role.startswith("eval") else fit_traces).append(trace)
    return eval_traces, fit_traces


def _capture(model, tokenizer, doc, length, decode, layers, path, config, info) -> TraceFile:
    import torch

    from topklab.decoding.capture import capture

    if tokenizer is None:  # tiny test models have no tokenizer: hash the text's bytes into the vocabulary
        raw = torch.tensor(list(doc.text.encode("utf-8")[:length]), dtype=torch.long)
        ids = raw % model.config.vocab_size
    else:
        ids = torch.tensor(tokenizer(doc.text)["input_ids"][:length], dtype=torch.long)
    if ids.numel() < length:
        raise ValueError(f"document {doc.title!r} has only {ids.numel()} tokens; {length} are needed")
    traces, ids = capture(model, ids[None].to(config.device), layers, prompt_len=length - decode)
    return TraceFile(save_trace(path, traces, ids, info))


def _trace_name(role: str, info: dict, text: str, length: int, decode: int, layers: str) -> str:
    """Readable, and unique to everything the trace depends on: slugs alone collide (``run_1`` and ``run-1``, long
    names cut short) and miss an edited text, which would reuse another model's or text's attention."""
    key = digest([info, digest(text), length, decode, layers])[:10]
    return f"{role}-{_slug(info['model'])[:40]}-{_slug(info['title'])[:40]}-{length}-{decode}-{key}.safetensors"


def _reuse(path: Path, info: dict) -> TraceFile | None:
    if not path.is_file():
        return None
    try:
        trace = TraceFile(path).verify()
    except TraceError as err:
        log.warning("recapturing %s: %s", path.name, err)
        return None
    if trace.info != info:
        log.warning("recapturing %s: it holds %s, not %s", path.name, trace.info, info)
        return None
    return trace


def _cell_key(spec, config, traces, fit_traces) -> str:
    ident = {
        "spec": spec, "ks": sorted(config.ks), "device": config.device,
        "traces": [(t.path.name, t.header["crc32"]["input_ids"]) for t in traces],
        "fit": [(t.path.name, t.header["crc32"]["input_ids"]) for t in fit_traces] if make(spec).trainable else [],
    }
    return digest(ident)[:10]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60] or "x"
