"""The indexer-recall study's analysis helpers: Pareto frontier and the IVF query/key mismatch measurement."""

import numpy as np
import pandas as pd
import torch

from topklab.analysis.ann_mismatch import scan_fractions, scan_to_recall
from topklab.analysis.pareto import pareto_frontier
from topklab.fidelity.traces import LayerTrace


def test_pareto_frontier_keeps_only_undominated_points(rng):
    points = pd.DataFrame({"bytes_read": torch.rand(60, generator=rng).numpy(),
                           "recall": torch.rand(60, generator=rng).numpy(), "k": np.repeat([16, 64], 30)})
    frontier = pareto_frontier(points, by=["k"])
    for k, front in frontier.groupby("k"):
        group = points[points.k == k]
        for _, row in group.iterrows():
            dominated = ((group.bytes_read <= row.bytes_read) & (group.recall > row.recall)).any()
            on_front = ((front.bytes_read == row.bytes_read) & (front.recall == row.recall)).any()
            assert on_front != dominated
        assert front.recall.is_monotonic_increasing and front.bytes_read.is_monotonic_increasing


def test_scan_fractions_match_probing_by_hand(rng):
    keys = torch.randn(400, 8, generator=rng)
    centroids = keys[:16].clone()
    searchers = torch.randn(6, 8, generator=rng)
    share, probes = scan_fractions(searchers, keys, centroids, k=10, target=0.9)
    assign = (keys @ centroids.T).argmax(-1)
    for i in range(6):
        order = (searchers[i] @ centroids.T).argsort(descending=True)
        truth = (searchers[i] @ keys.T).topk(10).indices
        for p in range(1, 17):
            probed = order[:p]
            if torch.isin(assign[truth], probed).sum() >= 9:
                assert probes[i] == p
                assert share[i] == torch.isin(assign, probed).float().mean()
                break


def test_scan_to_recall_separates_in_and_out_of_distribution_searchers(rng):
    """Keys from clusters; 'queries' far from every cluster need to scan more of the index than held-out keys."""
    centers = torch.randn(8, 16, generator=rng) * 4
    pick = torch.randint(0, 8, (600,), generator=rng)
    keys = centers[pick] + torch.randn(600, 16, generator=rng)
    queries = torch.randn(1, 2, 600, 16, generator=rng) * 3
    trace = LayerTrace(0, queries, keys[None, None], keys[None, None].clone(), None, 0.25, prompt_len=560)
    rows = scan_to_recall(trace, k=16, nlist=8, target=0.9)
    assert set(rows.searcher) == {"query", "key"} and len(rows) == 2 * 40 + 40
    medians = rows.groupby("searcher").scan_share.median()
    assert medians["key"] < medians["query"]
