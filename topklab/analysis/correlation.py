"""Does an indexer's fidelity predict downstream accuracy? (the study's claim 3)

Input: the tidy rows `topklab eval` writes (one per sample x decoding configuration; /work/notes/eval_schema.md).

**Configurations are the points, samples are the unit of resampling.** A configuration (model, indexer, k, per) is
one point: its accuracy is the mean task score over samples, its fidelity the mean of the decoding recorder's
per-sample means. Correlations are computed across these points. The configurations are chosen by design (an
oracle p grid, a list of indexers), not drawn from a population, so resampling them would answer a question nobody
asked. What is random is which prompts were drawn: every configuration is scored on the same samples, so the
points share their noise. The bootstrap therefore resamples *samples* (a prompt: task x length x seed x sample id),
applies the same resample to every configuration (paired), and recomputes every configuration's mean and then the
correlation. Resampling is stratified by task x length (each stratum resampled within itself, via
``scipy.stats.bootstrap(..., paired=False)`` with one index array per stratum), so every replicate keeps the
design's task mix. The intervals say how much the correlation would move with another draw of prompts of the same
kinds; they do not cover other models or other indexer families.

A sample that lacks some configuration (an unfinished run), or the fidelity a correlation needs (a decode that
recorded no step), is dropped from all of them, so that the design stays paired; a log line says how many.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

log = logging.getLogger(__name__)

FIDELITY_METRICS = ("recall", "mass_recall", "output_error")
#: +1 where higher fidelity should mean higher accuracy, -1 where lower should (an error).
DIRECTION = {"recall": 1, "mass_recall": 1, "output_error": -1}
METHODS = ("spearman", "pearson")
CONFIG_KEYS = ("model", "indexer", "k", "per", "config")  # config: the whole ident (sinks, window, k = 1 vs 1.0)
UNIT_KEYS = ("task", "length", "seed", "sample")
STRATUM_KEYS = ("task", "length")
DENSE = "dense"


def indexer_kind(spec: str) -> tuple[str, str, float]:
    """(kind, curve, p) of an indexer spec: kind is "dense", "oracle" or "indexer"; for the oracle, curve is its
    spec with p left at its default (one controlled-fidelity curve per fill/keep/seed choice) and p its precision."""
    if spec == DENSE:
        return "dense", DENSE, np.nan
    if spec.partition(":")[0] != "oracle":
        return "indexer", spec, np.nan
    from topklab.indexers import make

    oracle = make(spec)
    return "oracle", dataclasses.replace(oracle, p=1.0).spec, float(oracle.p)


@dataclasses.dataclass
class _Design:
    """Per-sample values of every configuration, as dense [samples, configurations] matrices, plus the strata."""

    configs: pd.DataFrame  # one row per configuration: CONFIG_KEYS present, kind, curve, p
    values: dict[str, np.ndarray]  # "score" and each fidelity metric -> [n_units, n_configs]
    strata: list[np.ndarray]  # unit indices of each stratum

    @property
    def n_units(self) -> int:
        return len(next(iter(self.values.values())))

    def means(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """Configuration means under resampling weights ``counts [L, n_units]`` -> ``[L, n_configs]`` each."""
        total = counts.sum(-1, keepdims=True)
        return {name: counts @ matrix / total for name, matrix in self.values.items()}

    def bootstrap(self, statistic: Callable[[dict[str, np.ndarray]], np.ndarray], n_resamples: int,
                  confidence_level: float, method: str, seed: int):
        """``scipy.stats.bootstrap`` of ``statistic(means) -> [n_stats, L]`` over samples, stratified and paired
        across configurations. Returns (estimate [n_stats], BootstrapResult)."""
        offsets = np.cumsum([0] + [len(s) for s in self.strata[:-1]])
        order = np.concatenate(self.strata)

        def on_indices(*parts, axis=-1):
            lead = parts[0].shape[:-1]
            global_idx = np.concatenate([np.asarray(p) + o for p, o in zip(parts, offsets)], axis=-1)
            flat = order[global_idx.reshape(-1, global_idx.shape[-1])]
            rows = np.arange(flat.shape[0])[:, None]
            counts = np.bincount((rows * self.n_units + flat).ravel(), minlength=flat.shape[0] * self.n_units)
            out = statistic(self.means(counts.reshape(flat.shape[0], self.n_units).astype(float)))
            return out.reshape(out.shape[0], *lead)

        estimate = on_indices(*[np.arange(len(s)) for s in self.strata])
        if min(len(s) for s in self.strata) < 2:
            raise ValueError(f"{self.n_units} sample(s): a bootstrap over samples needs at least 2")
        result = bootstrap([np.arange(len(s)) for s in self.strata], on_indices, n_resamples=n_resamples,
                           vectorized=True, paired=False, confidence_level=confidence_level, method=method, seed=seed)
        return estimate, result


def bootstrap(data, statistic, confidence_level: float = 0.95, seed: int = 0, **kwargs):
    """``scipy.stats.bootstrap`` with a seed, where a statistic undefined in some replicates (a correlation of a
    resample that happens to be constant) or a degenerate distribution (a Spearman rho of 1 in every replicate, where
    BCa has no interval) gets the percentile interval of its finite replicates instead of NaN."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(data, statistic, confidence_level=confidence_level, rng=np.random.default_rng(seed),
                                 **kwargs)
    low, high = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
    replicates = np.atleast_2d(result.bootstrap_distribution)
    tail = (1 - confidence_level) / 2 * 100
    for i in np.flatnonzero(np.isnan(low) | np.isnan(high)):
        finite = replicates[i][np.isfinite(replicates[i])]
        if len(finite):
            low[i], high[i] = np.percentile(finite, [tail, 100 - tail])
    if np.ndim(result.confidence_interval.low) == 0:
        low, high = low[0], high[0]
    return dataclasses.replace(result, confidence_interval=type(result.confidence_interval)(low, high))


def _design(results: pd.DataFrame, metrics: Sequence[str], require: Sequence[str] = ()) -> _Design:
    """Pivot tidy rows into the paired design; configurations missing any column in ``require`` are left out."""
    missing = sorted({"indexer", "score", *metrics} - set(results.columns))
    if missing:
        raise ValueError(f"results lack column(s) {missing}; expected the tidy rows of `topklab eval` "
                         "(see /work/notes/eval_schema.md)")
    config_keys = [c for c in CONFIG_KEYS if c in results.columns]
    unit_keys = [c for c in UNIT_KEYS if c in results.columns]
    if not unit_keys:
        raise ValueError(f"results need sample identifiers (some of {UNIT_KEYS}) to resample samples")
    frame = results.copy()
    frame["_config"] = frame.groupby(config_keys, dropna=False, sort=True).ngroup()
    frame["_unit"] = frame.groupby(unit_keys, dropna=False, sort=True).ngroup()
    configs = frame.groupby("_config").first()[config_keys].reset_index(drop=True)
    kinds = [indexer_kind(spec) for spec in configs["indexer"]]
    configs["kind"], configs["curve"], configs["p"] = zip(*kinds) if kinds else ((), (), ())
    keep = np.ones(len(configs), dtype=bool)
    for name in require:
        has = frame.groupby("_config")[name].apply(lambda s: s.notna().any()).to_numpy()
        keep &= has
    if not keep.any():
        raise ValueError(f"no configuration has recorded {', '.join(require)}: run the eval with recording on")
    cells = frame[frame["_config"].isin(np.flatnonzero(keep))]
    repeats = cells.duplicated(["_unit", "_config"])
    if repeats.any():
        raise ValueError(f"{int(repeats.sum())} row(s) repeat a sample under one configuration (runs with other "
                         f"settings, e.g. max_new_tokens, in one results folder?); keep one run's rows per sample: "
                         f"{', '.join(unit_keys)} x {', '.join(config_keys)}")
    table = cells.pivot_table(index="_unit", columns="_config", values=["score", *metrics], aggfunc="mean",
                              dropna=False)
    complete = table[["score", *require]].notna().all(axis=1)
    if not complete.all():
        log.warning("dropping %d of %d samples that lack some configuration or its %s (the comparison must be "
                    "paired)", int((~complete).sum()), len(complete), "/".join(["score", *require]))
    table = table[complete]
    if table.empty:
        raise ValueError("no sample was scored under every configuration; nothing to compare")
    configs = configs[keep].reset_index(drop=True)
    values = {name: table[name].to_numpy(float) for name in ["score", *metrics]}
    units = frame.drop_duplicates("_unit").set_index("_unit").loc[table.index]
    stratum_keys = [c for c in STRATUM_KEYS if c in units.columns]
    if stratum_keys:
        labels = units.groupby(stratum_keys, dropna=False, sort=True).ngroup().to_numpy()
        strata = [np.flatnonzero(labels == g) for g in np.unique(labels)]
    else:
        strata = [np.arange(len(units))]
    if min(len(s) for s in strata) < 2:
        log.warning("some task x length has a single sample: resampling all samples together instead")
        strata = [np.arange(len(units))]
    return _Design(configs, values, strata)


def configurations(results: pd.DataFrame, metrics: Sequence[str] = FIDELITY_METRICS, n_resamples: int = 2000,
                   confidence_level: float = 0.95, method: str = "percentile", seed: int = 0) -> pd.DataFrame:
    """One row per configuration: kind/curve/p, samples, accuracy with its bootstrap CI, and mean fidelity."""
    design = _design(results, metrics)
    out = design.configs.copy()
    out["samples"] = design.n_units
    out["accuracy"] = design.values["score"].mean(0)
    out["accuracy_low"] = out["accuracy_high"] = np.nan
    if design.n_units >= 2:
        _, boot = design.bootstrap(lambda means: means["score"].T, n_resamples, confidence_level, method, seed)
        out["accuracy_low"] = boot.confidence_interval.low
        out["accuracy_high"] = boot.confidence_interval.high
    for name in metrics:
        out[name] = pd.DataFrame(design.values[name]).mean().to_numpy()
    return out


def pearson(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson r along ``axis`` (vectorised over the others); NaN where either side is constant."""
    x = np.moveaxis(np.asarray(x, float), axis, -1)
    y = np.moveaxis(np.asarray(y, float), axis, -1)
    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    return np.clip(r, -1.0, 1.0)


def spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman rho (Pearson r of average ranks) along ``axis``, vectorised over the others."""
    return pearson(stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis), axis=axis)


def correlate(results: pd.DataFrame, metrics: Sequence[str] = FIDELITY_METRICS, by: Sequence[str] = (),
              n_resamples: int = 2000, confidence_level: float = 0.95, method: str = "BCa",
              seed: int = 0) -> pd.DataFrame:
    """Spearman and Pearson r between each fidelity metric and accuracy, across configurations.

    Scopes: ``all`` (every non-dense configuration with recorded fidelity) and, where several k were run,
    ``k=<k>`` (k held fixed, where at least 3 configurations share that k). Columns: [by...], scope, k, metric,
    method, configs, samples, r, ci_low, ci_high, strength (r signed so that positive means "higher fidelity,
    higher accuracy") and p_best: the share of bootstrap replicates in which this metric has the highest strength
    within its scope and method — how sure we are that it is the best predictor. Groups in ``by`` (e.g.
    ``["task"]``) are analysed separately.
    """
    if by:
        parts = []
        for key, group in results.groupby(list(by), sort=True):
            key = key if isinstance(key, tuple) else (key,)
            table = correlate(group, metrics, (), n_resamples, confidence_level, method, seed)
            parts.append(table.assign(**dict(zip(by, key)))[[*by, *table.columns]])
        return pd.concat(parts, ignore_index=True)
    rows = results[results["indexer"] != DENSE]
    recorded = [m for m in metrics if rows[m].notna().any()]
    if not recorded:
        raise ValueError(f"no fidelity was recorded ({', '.join(metrics)} are all NaN): run the eval with recording on")
    design = _design(rows, recorded, require=recorded)
    scopes = [("all", np.nan, np.arange(len(design.configs)))]
    if "k" in design.configs and design.configs["k"].nunique() > 1:  # with one k, "all" is already k held fixed
        for k, idx in design.configs.groupby("k", sort=True).indices.items():
            if len(idx) >= 3:
                scopes.append((f"k={k:g}", k, idx))
    scopes = [s for s in scopes if len(s[2]) >= 3]
    if not scopes:
        raise ValueError(f"only {len(design.configs)} configuration(s) with fidelity: a correlation needs at least 3")
    plan = [(scope, m, how) for scope in scopes for how in METHODS for m in recorded]

    def statistic(means):
        out = []
        for (_, _, idx), metric, how in plan:
            x, y = means[metric][:, idx], means["score"][:, idx]
            out.append(spearman(x, y) if how == "spearman" else pearson(x, y))
        return np.stack(out)

    estimate, boot = design.bootstrap(statistic, n_resamples, confidence_level, method, seed)
    table = pd.DataFrame({
        "scope": [s[0] for s, _, _ in plan], "k": [s[1] for s, _, _ in plan], "metric": [m for _, m, _ in plan],
        "method": [h for _, _, h in plan], "configs": [len(s[2]) for s, _, _ in plan], "samples": design.n_units,
        "r": estimate, "ci_low": boot.confidence_interval.low, "ci_high": boot.confidence_interval.high,
    })
    sign = table["metric"].map(DIRECTION).to_numpy()
    table["strength"] = table["r"] * sign
    replicates = boot.bootstrap_distribution * sign[:, None]
    table["p_best"] = np.nan
    for _, idx in table.groupby(["scope", "method"], sort=False).indices.items():
        block = np.nan_to_num(replicates[idx], nan=-np.inf)
        wins = np.isclose(block, block.max(0), rtol=0, atol=1e-12) & np.isfinite(block)
        share = wins / np.maximum(wins.sum(0), 1)  # metrics tied at the top (same ranking) split the win
        table.loc[table.index[idx], "p_best"] = share.mean(1)
    return table


def best_predictor(correlations: pd.DataFrame, method: str = "spearman") -> pd.DataFrame:
    """Per scope (and ``by`` group): the metric with the highest strength, its r, CI and p_best (scopes where no
    correlation is defined, e.g. every configuration scored the same, have no row)."""
    table = correlations[(correlations["method"] == method) & correlations["strength"].notna()]
    group = [c for c in correlations.columns if c not in
             ("k", "metric", "method", "configs", "samples", "r", "ci_low", "ci_high", "strength", "p_best")]
    best = table.loc[table.groupby(group, sort=False)["strength"].idxmax().dropna()]
    return best.reset_index(drop=True)


def oracle_gap(results: pd.DataFrame, metric: str = "recall", n_resamples: int = 2000,
               confidence_level: float = 0.95, method: str = "percentile", seed: int = 0) -> pd.DataFrame:
    """Where real indexers sit against the controlled-fidelity oracle curve.

    For each non-oracle configuration, the oracle curve of the same model, per and k (accuracy against ``metric``
    over the oracle's p grid, linearly interpolated, clamped at its ends) gives the accuracy the oracle reaches at
    the indexer's fidelity; ``gap`` = indexer accuracy - that, with a bootstrap CI over samples. A positive gap:
    the indexer's misses hurt less than random ones (its misses are near-misses); negative: worse than random.
    """
    rows = results[results["indexer"] != DENSE]
    design = _design(rows, [metric], require=[metric])
    configs = design.configs
    group_keys = [c for c in ("model", "per", "k") if c in configs]
    pairs = []  # (indexer config index, oracle config indices sorted by p, curve name)
    oracles = configs[configs["kind"] == "oracle"]
    for i, row in configs[configs["kind"] == "indexer"].iterrows():
        same = oracles
        for key in group_keys:
            same = same[same[key] == row[key]]
        for curve, points in same.groupby("curve", sort=True):
            if len(points) >= 2:
                pairs.append((i, points.sort_values("p").index.to_numpy(), curve))
    if not pairs:
        raise ValueError("no indexer configuration has an oracle curve (>= 2 oracle p values) at its model, per and k")

    def statistic(means):
        x, acc = means[metric], means["score"]
        out = []
        for i, points, _ in pairs:
            out.append(acc[:, i] - _interp_rows(x[:, i], x[:, points], acc[:, points]))
        return np.stack(out)

    estimate, boot = design.bootstrap(statistic, n_resamples, confidence_level, method, seed)
    base = configs.loc[[i for i, _, _ in pairs], [*group_keys, "indexer"]].reset_index(drop=True)
    base["oracle"] = [curve for _, _, curve in pairs]
    base["metric"] = metric
    base["fidelity"] = [design.values[metric][:, i].mean() for i, _, _ in pairs]
    base["accuracy"] = [design.values["score"][:, i].mean() for i, _, _ in pairs]
    base["oracle_accuracy"] = base["accuracy"] - estimate
    base["gap"] = estimate
    base["gap_low"] = boot.confidence_interval.low
    base["gap_high"] = boot.confidence_interval.high
    base["samples"] = design.n_units
    return base


def _interp_rows(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Row-wise ``np.interp``: ``x [L]``, ``xp, fp [L, P]`` (xp in any order) -> ``[L]``, clamped at the ends."""
    order = np.argsort(xp, axis=-1, kind="stable")
    xp, fp = np.take_along_axis(xp, order, -1), np.take_along_axis(fp, order, -1)
    right = np.clip((xp <= x[:, None]).sum(-1), 1, xp.shape[-1] - 1)
    left = right - 1
    rows = np.arange(len(x))
    x0, x1, y0, y1 = xp[rows, left], xp[rows, right], fp[rows, left], fp[rows, right]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(x1 > x0, (x - x0) / (x1 - x0), 0.0)
    return y0 + np.clip(t, 0.0, 1.0) * (y1 - y0)
