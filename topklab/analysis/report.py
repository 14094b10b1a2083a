"""`topklab report RESULTS_DIR`: a markdown report (tables and figures) of whatever a results folder holds.

It looks in RESULTS_DIR and its subfolders (two levels) for what the jobs write and gives each its section:
- `topklab eval` results (results.parquet or cells/*.parquet with a ``score`` column): accuracy per configuration
  and task, fidelity-accuracy correlations with bootstrap CIs, the best predictor, real indexers vs the oracle;
- `topklab recall` results (rows with ``recall`` and ``trace``): recall / mass recall per indexer and k, cost;
- entropy rows (entropy.parquet): entropy per layer and head, its relation to lost mass, shifts between models.
The report goes to RESULTS_DIR/report.md (or --out), its figures to a ``figures/`` folder beside it.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import pandas as pd

from topklab.analysis import correlation, entropy, figures
from topklab.io import read_table, write_text

log = logging.getLogger(__name__)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results_dir", metavar="RESULTS_DIR", help="a folder written by topklab eval / recall / "
                        "the entropy experiment, or a folder holding several of them")
    parser.add_argument("--out", default=None, help="report file (default: RESULTS_DIR/report.md)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for confidence intervals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--baseline", default=None,
                        help="model the entropy of the others is compared with (default: the first model by name)")


def main(argv: list[str] | None = None) -> int:
    """``python -m topklab.analysis.report RESULTS_DIR`` (the same as ``topklab report``)."""
    parser = argparse.ArgumentParser(prog="topklab report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_report_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return run_report(parser.parse_args(argv))
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"topklab report: error: {err}\n")


def run_report(args) -> int:
    path = write_report(args.results_dir, args.out, n_resamples=args.resamples, seed=args.seed,
                        baseline=args.baseline)
    print(f"report: {path}")
    return 0


def write_report(results_dir, out=None, n_resamples: int = 2000, seed: int = 0, baseline: str | None = None) -> Path:
    """Write the markdown report of ``results_dir`` and its figures; returns the report's path."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no results folder at {root}")
    out = Path(out) if out else root / "report.md"
    if out.is_dir():
        raise ValueError(f"the report's path {out} is a folder; give a file, e.g. {out / 'report.md'}")
    context = _Context(out.parent / "figures", out.parent, n_resamples, seed)
    sections = []
    for folder in [root, *sorted(p for p in root.glob("*") if p.is_dir()),
                   *sorted(p for p in root.glob("*/*") if p.is_dir())]:
        name = str(folder.relative_to(root)) if folder != root else root.name
        results = load_results(folder)
        if results is not None and "score" in results:
            sections.append(eval_section(results, name, context))
        elif results is not None and {"recall", "trace"} <= set(results.columns):
            sections.append(recall_section(results, name, context))
        if (folder / entropy.ENTROPY_FILE).is_file():
            sections.append(entropy_section(read_table(folder / entropy.ENTROPY_FILE), name, context, baseline))
    if not sections:
        raise FileNotFoundError(f"{root} holds no results this report reads (results.parquet, cells/*.parquet or "
                                f"{entropy.ENTROPY_FILE}, in it or in its subfolders)")
    text = f"# topklab report: {root.name}\n\n" + "\n".join(sections)
    return write_text(text, out)


def load_results(folder: Path) -> pd.DataFrame | None:
    """results.parquet, or the cells of a run still in progress merged; None if the folder has neither."""
    if (folder / "results.parquet").is_file():
        return read_table(folder / "results.parquet")
    cells = sorted((folder / "cells").glob("*.parquet"))
    return pd.concat([read_table(c) for c in cells], ignore_index=True) if cells else None


class _Context:
    def __init__(self, figures_dir: Path, report_dir: Path, n_resamples: int, seed: int):
        self.figures_dir, self.report_dir, self.n_resamples, self.seed = figures_dir, report_dir, n_resamples, seed

    def figure(self, plot, data, name: str, section: str, **kwargs) -> str:
        """Draw one figure; markdown linking it, or a note saying why it could not be drawn."""
        slug = "".join(ch if ch.isalnum() else "-" for ch in section).strip("-") or "results"
        try:
            path = plot(data, self.figures_dir / f"{slug}-{name}.png", **kwargs)
        except ValueError as err:
            return f"_Figure {name} not drawn: {err}_\n"
        return f"![{name}]({path.relative_to(self.report_dir).as_posix()})\n"


def _config_needed(configs: pd.DataFrame) -> bool:
    """Whether the long ``config`` ident must be shown: only when model, indexer, k and per leave rows alike (other
    sinks or windows, or k = 1 next to the ratio 1.0)."""
    shown = [c for c in ("model", "indexer", "k", "per") if c in configs]
    return "config" in configs and bool(configs.duplicated(shown).any())


def eval_section(results: pd.DataFrame, name: str, ctx: _Context) -> str:
    models = ", ".join(sorted(results["model"].astype(str).unique())) if "model" in results else "?"
    units = [c for c in correlation.UNIT_KEYS if c in results]
    samples = results.drop_duplicates(units).groupby("task").size() if "task" in results else pd.Series(dtype=int)
    lines = [f"## Downstream accuracy and fidelity: `{name}`\n",
             f"Model(s): {models}. Samples per task: "
             + (", ".join(f"{t} {n}" for t, n in samples.items()) or "?")
             + (f"; lengths {sorted(results['length'].unique().tolist())}" if "length" in results else "") + ".\n"]
    configs = correlation.configurations(results, n_resamples=ctx.n_resamples, seed=ctx.seed)
    shown = configs.assign(accuracy=_with_ci(configs["accuracy"], configs["accuracy_low"], configs["accuracy_high"]))
    keep = [c for c in ("model", "indexer", "k", "per", "config", "samples", "accuracy",
                        *correlation.FIDELITY_METRICS) if c in shown and (c != "config" or _config_needed(shown))]
    lines += ["### Configurations\n", "Accuracy = mean score over samples with a 95% bootstrap CI over samples "
              "(stratified by task and length); fidelity = mean of the decoding recorder's per-sample means.\n",
              markdown_table(shown[keep]), ""]
    if "task" in results and results["task"].nunique() > 1:
        keys = [c for c in correlation.CONFIG_KEYS if c in results]
        per_task = results.groupby([*keys, "task"], dropna=False)["score"].mean().unstack("task").reset_index()
        if "config" in per_task and not _config_needed(per_task):
            per_task = per_task.drop(columns="config")
        lines += ["### Accuracy per task\n", markdown_table(per_task), ""]
    lines.append(ctx.figure(figures.fidelity_vs_accuracy, configs, "fidelity-vs-accuracy", name))
    lines += ["### Does fidelity predict accuracy?\n",
              "Correlations across configurations (dense excluded), with BCa bootstrap CIs that resample samples "
              "paired across configurations (see `topklab.analysis.correlation`). `strength` is r signed so that "
              "positive means higher fidelity goes with higher accuracy; `p_best` is the share of bootstrap "
              "replicates in which the metric predicts best within its scope and method.\n"]
    try:
        table = correlation.correlate(results, n_resamples=ctx.n_resamples, seed=ctx.seed)
    except ValueError as err:
        lines.append(f"_Not computed: {err}_\n")
    else:
        lines += [markdown_table(table), "", "Best predictor (Spearman):\n",
                  markdown_table(correlation.best_predictor(table)[["scope", "metric", "r", "ci_low", "ci_high",
                                                                     "p_best"]]), ""]
        lines.append(ctx.figure(figures.correlation_forest, table, "correlations", name))
    lines += ["### Real indexers against the oracle curve\n",
              "`gap` = the indexer's accuracy minus the oracle's (random misses) at the same fidelity, interpolated "
              "along the oracle's p grid at the same k; 95% bootstrap CI over samples. At the same recall@k a real "
              "indexer whose misses are near-misses keeps more attention mass than the oracle; at the same mass "
              "recall that advantage should vanish if mass is what matters.\n"]
    for metric in ("recall", "mass_recall"):
        lines.append(f"At the same {figures.LABELS[metric]}:\n")
        try:
            gaps = correlation.oracle_gap(results, metric=metric, n_resamples=ctx.n_resamples, seed=ctx.seed)
        except ValueError as err:
            lines.append(f"_Not computed: {err}_\n")
            continue
        lines += [markdown_table(gaps.drop(columns=["metric"])), "",
                  ctx.figure(figures.oracle_gap_figure, gaps, f"oracle-gap-{metric}", name)]
    return "\n".join(lines)


def recall_section(results: pd.DataFrame, name: str, ctx: _Context) -> str:
    from topklab.analysis.plots import recall_vs_k
    from topklab.fidelity.recall_job import summarize

    summary = summarize(results)
    models = ", ".join(sorted(results["model"].astype(str).unique())) if "model" in results else "?"
    lines = [f"## Indexer recall on real attention: `{name}`\n",
             f"Model(s): {models}; {results['trace'].nunique()} document(s), layers "
             f"{sorted(results['layer'].unique().tolist())}, "
             f"{int(results.groupby('trace')['position'].nunique().min())} decode positions per document. "
             "Means over layers, heads, positions and documents.\n",
             markdown_table(summary), "",
             ctx.figure(recall_vs_k, results, "recall-vs-k", name),
             ctx.figure(figures.recall_vs_cost, summary, "recall-vs-cost", name)]
    return "\n".join(lines)


def entropy_section(rows: pd.DataFrame, name: str, ctx: _Context, baseline: str | None) -> str:
    summary = entropy.head_summary(rows)
    lost = [c for c in summary.columns if c.startswith("lost_at_k_")]
    per_layer = summary.groupby(["model", "layer"], as_index=False)[["entropy", "norm_entropy", *lost]].mean()
    lines = [f"## Attention entropy at decode positions: `{name}`\n",
             f"{len(rows)} rows: models {sorted(rows['model'].astype(str).unique())}, "
             f"{rows.drop_duplicates([c for c in entropy.UNIT_KEYS if c in rows]).shape[0]} prompt(s). "
             "Entropy in nats; normalised by log(context); lost_at_k = dense attention mass outside the exact "
             "Top-k. Means per layer over heads, positions and prompts:\n",
             markdown_table(per_layer), "",
             ctx.figure(figures.entropy_by_layer, rows, "entropy-by-layer", name),
             ctx.figure(figures.entropy_heatmap, summary, "entropy-heatmap", name),
             "### Entropy and the mass Top-k loses, across heads\n",
             "Spearman rho across heads (head means), 95% bootstrap CI resampling heads.\n",
             markdown_table(entropy.entropy_mass_relation(rows, n_resamples=ctx.n_resamples, seed=ctx.seed)), "",
             ctx.figure(figures.entropy_vs_lost_mass, summary, "entropy-vs-lost-mass", name)]
    models = sorted(rows["model"].astype(str).unique())
    if len(models) > 1:
        base = baseline or models[0]
        shift = entropy.entropy_shift(rows, base, n_resamples=ctx.n_resamples, seed=ctx.seed)
        lines += [f"### Entropy shift against `{base}`\n",
                  "Mean difference in normalised entropy on the same prompts (negative: sharper attention), "
                  "95% bootstrap CI over prompts; layer <NA> = all layers.\n", markdown_table(shift), ""]
    return "\n".join(lines)


def _with_ci(value: pd.Series, low: pd.Series, high: pd.Series) -> pd.Series:
    return [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(value, low, high)]


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table; float columns to ``digits`` decimals (whole numbers if all are), missing empty."""
    def column(values: pd.Series) -> list[str]:
        if pd.api.types.is_float_dtype(values):
            whole = values.dropna().map(float.is_integer).all()
            return ["" if pd.isna(v) else f"{v:.0f}" if whole else f"{v:.{digits}f}" for v in values.astype(float)]
        return ["" if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))
                else str(v).replace("|", "\\|") for v in values]

    cells = [column(frame[c]) for c in frame.columns]
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in zip(*cells)])


if __name__ == "__main__":
    sys.exit(main())
