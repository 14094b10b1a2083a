"""Turn a `topklab recall` results folder into the indexer-recall study: tables, Pareto frontier, figures, README.

usage: analyze.py RESULTS_DIR OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from topklab.analysis.ann_mismatch import scan_to_recall  # noqa: E402
from topklab.analysis.pareto import pareto_frontier  # noqa: E402
from topklab.fidelity.traces import TraceFile  # noqa: E402
from topklab.io import atomic_write, write_table, write_text  # noqa: E402

FOCUS_K = 64


def main(results_dir: Path, out: Path) -> None:
    results = pd.read_parquet(results_dir / "results.parquet")
    config = json.loads((results_dir / "config.json").read_text())
    per_layer = results.groupby(["family", "indexer", "layer", "k"], as_index=False)[
        ["recall", "mass_recall", "output_error", "bytes_read", "keys_scored"]].mean()
    overall = per_layer.groupby(["family", "indexer", "k"], as_index=False).mean(numeric_only=True).drop(columns="layer")
    exact_bytes = overall.loc[overall.indexer == "exact", "bytes_read"].mean()
    overall["bytes_vs_exact"] = overall["bytes_read"] / exact_bytes
    write_table(overall, out / "summary.csv")

    focus = overall[overall.k == FOCUS_K].sort_values(["family", "bytes_read"])
    frontier = pareto_frontier(overall, cost="bytes_read", quality="recall", by=["k"])
    frontier_focus = frontier[frontier.k == FOCUS_K]
    layer_frontier = pareto_frontier(per_layer[per_layer.k == FOCUS_K], "bytes_read", "recall", by=["layer"])

    _figure_tradeoff(overall, frontier, out / "recall_vs_bytes.png")
    _figure_layers(per_layer[per_layer.k == FOCUS_K], layer_frontier, out / "recall_vs_bytes_per_layer.png")

    traces = sorted((results_dir / "traces").glob("eval*.safetensors"))
    mismatch = pd.concat([scan_to_recall(TraceFile(traces[-1]).layer(layer), k=FOCUS_K, nlist=64, target=0.9)
                          for layer in TraceFile(traces[-1]).layers], ignore_index=True)
    write_table(mismatch, out / "mismatch.csv")
    _figure_mismatch(mismatch, out / "mismatch.png")
    mismatch_table = mismatch.groupby(["layer", "searcher"])["scan_share"].median().unstack("searcher")

    columns = ["indexer", "recall", "mass_recall", "output_error", "bytes_vs_exact", "keys_scored"]
    write_text(README.format(
        model=config["model"], lengths=", ".join(map(str, config["lengths"])), decode=config["decode"],
        layers=", ".join(map(str, sorted(results.layer.unique()))), ks=", ".join(map(str, sorted(results.k.unique()))),
        rows=len(results), n_indexers=results.indexer.nunique(), n_families=results.family.nunique(), k=FOCUS_K,
        table=focus[columns].to_markdown(index=False, floatfmt=".3f"),
        frontier=frontier_focus[columns].to_markdown(index=False, floatfmt=".3f"),
        mismatch=mismatch_table.to_markdown(floatfmt=".3f"),
        q_share=mismatch[mismatch.searcher == "query"].scan_share.median(),
        k_share=mismatch[mismatch.searcher == "key"].scan_share.median(),
        mismatch_trace=traces[-1].stem,
    ), out / "README.md")


def _figure_tradeoff(overall, frontier, path):
    sns.set_theme(style="whitegrid", context="paper")
    grid = sns.relplot(data=overall, x="bytes_vs_exact", y="recall", hue="family", style="family", col="k",
                       col_wrap=3, height=3, s=60)
    for ax, (k, part) in zip(grid.axes.flat, frontier.groupby("k")):
        ax.plot(part.bytes_read / overall.loc[overall.indexer == "exact", "bytes_read"].mean(), part.recall,
                color="black", lw=1, ls="--", label="Pareto frontier")
    grid.set(xscale="log", ylim=(-0.02, 1.02))
    grid.set_axis_labels("bytes read per query / exact", "recall@k")
    atomic_write(path, lambda tmp: grid.figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(grid.figure)


def _figure_layers(per_layer, frontier, path):
    grid = sns.relplot(data=per_layer, x="bytes_read", y="recall", hue="family", style="family", col="layer",
                       col_wrap=4, height=2.6, s=50)
    for ax, (layer, part) in zip(grid.axes.flat, frontier.groupby("layer")):
        ax.plot(part.bytes_read, part.recall, color="black", lw=1, ls="--")
    grid.set(xscale="log", ylim=(-0.02, 1.02))
    grid.set_axis_labels("bytes read per query", f"recall@{FOCUS_K}")
    atomic_write(path, lambda tmp: grid.figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(grid.figure)


def _figure_mismatch(mismatch, path):
    fig, ax = plt.subplots(figsize=(8, 3))
    sns.boxplot(data=mismatch, x="layer", y="scan_share", hue="searcher", ax=ax, fliersize=1)
    ax.set_ylabel(f"share of keys scanned\nfor 90% recall@{FOCUS_K}")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


README = """# Indexer recall vs cost on real attention

Generated by `experiments/indexer_recall/run.sh` (which runs `topklab recall` and then `analyze.py`); do not edit by
hand. Model: `{model}`; bundled Wikipedia articles at {lengths} tokens, the last {decode} tokens of each replayed as
decode steps (each indexer is built on the prompt's keys and `add`s one key per step); layers {layers}; k in {ks}.
{rows} measurements (one per document x layer x query head x position x indexer x k), {n_indexers} indexer
configurations from {n_families} families.

## Recall, mass recall and cost at k = {k}

Means over layers, heads, positions and documents. `bytes_vs_exact`: index bytes read per query relative to
scoring every key exactly; `keys_scored`: keys scored at full precision per query.

{table}

## Pareto frontier (recall@{k} vs bytes read)

{frontier}

![recall vs bytes](recall_vs_bytes.png)

Per layer, k = {k}:

![recall vs bytes per layer](recall_vs_bytes_per_layer.png)

## Do key-built ANN indexes suffer from the query/key mismatch here?

An IVF index (64 lists, k-means on the prompt's keys, inner-product assignment) probed best-list-first: the share of
keys that must be scanned before recall@{k} reaches 90%, for the decode queries and, as a control, for the same
positions' keys searching the same prompt keys (trace `{mismatch_trace}`). Median per layer:

{mismatch}

Overall median: queries scan {q_share:.1%} of the keys, keys scan {k_share:.1%}.

![scan share](mismatch.png)
"""


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
