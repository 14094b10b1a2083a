"""Seaborn figures of tidy fidelity results."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from topklab.io import atomic_write

METRIC_LABELS = {"recall": "recall@k", "mass_recall": "attention-mass recall"}


def recall_vs_k(results: pd.DataFrame, path, title: str | None = None) -> Path:
    """recall@k and attention-mass recall vs k, one line per indexer, one column per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    means = results.groupby(["indexer", "layer", "k"], as_index=False)[list(METRIC_LABELS)].mean()
    long = means.melt(id_vars=["indexer", "layer", "k"], value_vars=list(METRIC_LABELS), var_name="metric")
    long["metric"] = long["metric"].map(METRIC_LABELS)
    sns.set_theme(style="whitegrid", context="paper")
    grid = sns.relplot(data=long, x="k", y="value", hue="indexer", row="metric", col="layer", kind="line",
                       marker="o", height=2.3, aspect=0.9, facet_kws={"sharey": True})
    ks = sorted(means["k"].unique())
    grid.set(xscale="log", ylim=(-0.02, 1.02))
    for ax in grid.axes.flat:
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
    grid.set_titles("layer {col_name}")
    grid.set_axis_labels("k", "")
    for row, label in zip(grid.axes, grid.row_names):
        row[0].set_ylabel(label)
    if title:
        grid.figure.suptitle(title, y=1.02)
    out = atomic_write(path, lambda tmp: grid.figure.savefig(tmp, format=Path(path).suffix[1:] or "png", dpi=110,
                                                              bbox_inches="tight"))
    plt.close(grid.figure)
    return out
