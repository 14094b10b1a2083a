"""Seaborn figures of the analyses in `correlation` and `entropy` (and recall vs cost for `topklab recall`).

Each function takes the tidy table its analysis returns, writes one image atomically (format from the suffix) and
returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from topklab.analysis.correlation import DIRECTION, FIDELITY_METRICS
from topklab.io import atomic_write

LABELS = {"recall": "recall@k", "mass_recall": "attention-mass recall", "output_error": "output error",
          "norm_entropy": "entropy / log(context)", "entropy": "entropy (nats)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def _save(figure, path) -> Path:
    plt, _ = _pyplot()
    suffix = Path(path).suffix[1:] or "png"
    out = atomic_write(path, lambda tmp: figure.savefig(tmp, format=suffix, dpi=110, bbox_inches="tight"))
    plt.close(figure)
    return out


def fidelity_vs_accuracy(configs: pd.DataFrame, path, metrics: Sequence[str] = FIDELITY_METRICS,
                         title: str | None = None) -> Path:
    """Accuracy (with its CI) against each fidelity metric: oracle curves per k as lines, real indexers as
    points, dense attention as a dashed line. ``configs`` is `correlation.configurations`' table."""
    plt, sns = _pyplot()
    metrics = [m for m in metrics if m in configs and configs[m].notna().any()]
    if not metrics:
        raise ValueError("no fidelity metric with values to plot")
    data = configs.assign(k=configs["k"].map(lambda k: "" if pd.isna(k) else f"{k:g}"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), sharey=True, squeeze=False)
    ks = sorted({k for k in data.loc[data["kind"] != "dense", "k"]}, key=float)
    palette = dict(zip(ks, sns.color_palette("viridis", len(ks))))
    dense = data[data["kind"] == "dense"]
    for ax, metric in zip(axes[0], metrics):
        oracle = data[data["kind"] == "oracle"].sort_values("p")
        for (curve, k), points in oracle.groupby(["curve", "k"], sort=True):
            sns.lineplot(data=points, x=metric, y="accuracy", color=palette[k], marker="o", sort=False, ax=ax,
                         label=f"{curve}, k={k}", estimator=None)
        real = data[data["kind"] == "indexer"]
        if len(real):
            sns.scatterplot(data=real, x=metric, y="accuracy", hue="k", palette=palette, style="indexer", s=60,
                            ax=ax, legend=ax is axes[0][-1], zorder=3)
        shown = data[data["kind"] != "dense"]
        ax.errorbar(shown[metric], shown["accuracy"],
                    yerr=[shown["accuracy"] - shown["accuracy_low"], shown["accuracy_high"] - shown["accuracy"]],
                    fmt="none", ecolor="0.6", elinewidth=0.8, zorder=1)
        for _, row in dense.iterrows():
            ax.axhline(row["accuracy"], color="0.3", linestyle="--", linewidth=1)
            ax.axhspan(row["accuracy_low"], row["accuracy_high"], color="0.5", alpha=0.12)
        ax.set(xlabel=LABELS.get(metric, metric), ylabel="accuracy", ylim=(-0.03, 1.03))
        if ax is not axes[0][-1] and ax.get_legend():
            ax.get_legend().remove()
    axes[0][-1].legend(fontsize="x-small", bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(title or "accuracy vs indexer fidelity (dashed: dense attention; bars: 95% CI over samples)",
                 y=1.02)
    return _save(fig, path)


def correlation_forest(correlations: pd.DataFrame, path, title: str | None = None) -> Path:
    """Signed correlation ("strength": positive = higher fidelity, higher accuracy) per scope and metric with its
    CI, one panel per method. ``correlations`` is `correlation.correlate`'s table."""
    plt, sns = _pyplot()
    data = correlations.copy()
    sign = data["metric"].map(DIRECTION)
    low, high = data["ci_low"] * sign, data["ci_high"] * sign
    data["lo"], data["hi"] = np.minimum(low, high), np.maximum(low, high)
    scopes = list(dict.fromkeys(data["scope"]))
    metrics = list(dict.fromkeys(data["metric"]))
    methods = list(dict.fromkeys(data["method"]))
    colors = dict(zip(metrics, sns.color_palette("deep", len(metrics))))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 0.5 + 0.45 * len(scopes) * len(metrics)),
                             sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        part = data[data["method"] == method]
        for j, metric in enumerate(metrics):
            rows = part[part["metric"] == metric].set_index("scope").reindex(scopes)
            y = np.arange(len(scopes)) + (j - (len(metrics) - 1) / 2) * 0.22
            ax.hlines(y, rows["lo"], rows["hi"], color=colors[metric], linewidth=1.5)
            ax.plot(rows["strength"], y, "o", color=colors[metric], label=LABELS.get(metric, metric))
        ax.axvline(0, color="0.4", linewidth=0.8)
        ax.set(yticks=np.arange(len(scopes)), yticklabels=scopes, title=method, xlabel="",
               xlim=(min(-0.1, float(np.nanmin(data["lo"].to_numpy(), initial=0)) - 0.05), 1.05))
    axes[0][0].invert_yaxis()
    fig.supxlabel("correlation with accuracy across configurations (signed: + = higher fidelity, higher accuracy)",
                  fontsize="small")
    axes[0][-1].legend(fontsize="x-small", bbox_to_anchor=(1.02, 1), loc="upper left")
    if title:
        fig.suptitle(title, y=1.02)
    return _save(fig, path)


def oracle_gap_figure(gaps: pd.DataFrame, path, title: str | None = None) -> Path:
    """Each real indexer's accuracy minus the oracle's at the same fidelity, with its CI (`correlation.oracle_gap`)."""
    plt, sns = _pyplot()
    data = gaps.assign(label=gaps["indexer"] + "  k=" + gaps["k"].map("{:g}".format)).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(5.5, 0.6 + 0.3 * len(data)))
    sns.scatterplot(data=data, x="gap", y="label", hue="oracle", ax=ax, s=40, zorder=3)
    ax.hlines(data["label"], data["gap_low"], data["gap_high"], color="0.5", linewidth=1.2)
    ax.axvline(0, color="0.3", linestyle="--", linewidth=1)
    metric = LABELS.get(str(data["metric"].iloc[0]), str(data["metric"].iloc[0]))
    ax.set(xlabel=f"accuracy - oracle accuracy at the same {metric}", ylabel="")
    ax.set_title(title or "real indexers against the oracle curve (95% CI over samples)")
    return _save(fig, path)


def entropy_heatmap(summary: pd.DataFrame, path, column: str = "norm_entropy", title: str | None = None) -> Path:
    """Mean ``column`` per layer (rows) and head (columns), one panel per model (`entropy.head_summary`)."""
    plt, sns = _pyplot()
    models = list(dict.fromkeys(summary["model"])) if "model" in summary else [None]
    fig, axes = plt.subplots(1, len(models), figsize=(0.5 + 0.35 * summary["head"].nunique() * len(models) + 1.5,
                                                      0.8 + 0.3 * summary["layer"].nunique()), squeeze=False)
    for ax, model in zip(axes[0], models):
        part = summary if model is None else summary[summary["model"] == model]
        grid = part.pivot(index="layer", columns="head", values=column)
        sns.heatmap(grid, ax=ax, cmap="mako", vmin=0, vmax=1 if column == "norm_entropy" else None,
                    cbar_kws={"label": LABELS.get(column, column)})
        ax.set_title(model or "")
    if title:
        fig.suptitle(title, y=1.02)
    return _save(fig, path)


def entropy_vs_lost_mass(summary: pd.DataFrame, path, title: str | None = None) -> Path:
    """One point per head: normalised entropy against the attention mass the exact Top-k loses, one panel per k
    (columns) and model (rows); ``summary`` is `entropy.head_summary`'s table."""
    plt, sns = _pyplot()
    lost = [c for c in summary.columns if c.startswith("lost_at_k_")]
    if not lost:
        raise ValueError("the head summary holds no lost_at_k_<k> column")
    data = summary.melt(id_vars=[c for c in summary.columns if c not in lost], value_vars=lost, var_name="k",
                        value_name="lost")
    data["k"] = data["k"].str.removeprefix("lost_at_k_").astype(int)
    grid = sns.relplot(data=data, x="norm_entropy", y="lost", hue="layer", col="k",
                       row="model" if "model" in data else None, palette="viridis", height=2.8, aspect=1.0, s=30)
    grid.set_axis_labels(LABELS["norm_entropy"], "attention mass lost by exact Top-k")
    grid.set_titles("{row_name} | k = {col_name}" if "model" in data else "k = {col_name}")
    grid.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    if title:
        grid.figure.suptitle(title, y=1.03)
    return _save(grid.figure, path)


def entropy_by_layer(rows: pd.DataFrame, path, column: str = "norm_entropy", hue: str = "model", seed: int = 0,
                     title: str | None = None) -> Path:
    """Mean ``column`` per layer, one line per ``hue`` (model, or task); the band is a 95% bootstrap CI over prompts
    (rows are first averaged per prompt and layer, so positions and heads of one prompt are not counted as
    independent)."""
    plt, sns = _pyplot()
    units = [c for c in ("model", "task", "length", "sample", "seq") if c in rows]
    per_prompt = rows.groupby([*units, "layer"], as_index=False, sort=True)[column].mean()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    sns.lineplot(data=per_prompt, x="layer", y=column, hue=hue if hue in per_prompt else None, marker="o",
                 errorbar=("ci", 95), seed=seed, ax=ax)
    ax.set(ylabel=LABELS.get(column, column), title=title or "attention entropy at decode positions (95% CI)")
    ax.set_xticks(sorted(per_prompt["layer"].unique()))
    return _save(fig, path)


def recall_vs_cost(summary: pd.DataFrame, path, title: str | None = None) -> Path:
    """recall@k against bytes read per query (relative to exact), one point per indexer and k (`topklab recall`'s
    summary.csv)."""
    plt, sns = _pyplot()
    exact = summary.loc[summary["indexer"] == "exact", "bytes_read"]
    reference = float(exact.mean()) if len(exact) else float(summary["bytes_read"].max())
    data = summary.assign(relative_bytes=summary["bytes_read"] / reference,
                          family=summary["indexer"].str.partition(":")[0])
    grid = sns.relplot(data=data, x="relative_bytes", y="recall", hue="family", style="family", col="k",
                       col_wrap=min(4, data["k"].nunique()), height=2.8, s=50)
    grid.set(xscale="log", ylim=(-0.02, 1.02))
    grid.set_axis_labels("bytes read per query / exact", "recall@k")
    if title:
        grid.figure.suptitle(title, y=1.03)
    return _save(grid.figure, path)
