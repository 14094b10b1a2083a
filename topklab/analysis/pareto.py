"""Recall-vs-cost trade-offs: the Pareto frontier of indexer configurations."""

from __future__ import annotations

import pandas as pd


def pareto_frontier(points: pd.DataFrame, cost: str = "bytes_read", quality: str = "recall",
                    by: list[str] | None = None) -> pd.DataFrame:
    """Rows not dominated by another (no cheaper-or-equal row with higher-or-equal quality, one strictly better).

    ``points`` holds one row per configuration (e.g. mean recall and bytes read per indexer at one k); with ``by``
    the frontier is computed within each group (e.g. per layer or per k). Returned sorted by cost.
    """
    if by:
        parts = [pareto_frontier(group, cost, quality) for _, group in points.groupby(by, sort=True)]
        return pd.concat(parts, ignore_index=True) if parts else points.iloc[:0]
    ordered = points.sort_values([cost, quality], ascending=[True, False])
    best, keep = float("-inf"), []
    for idx, value in zip(ordered.index, ordered[quality]):
        if value > best:
            keep.append(idx)
            best = value
    return ordered.loc[keep].reset_index(drop=True)
