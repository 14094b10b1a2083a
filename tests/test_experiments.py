"""The experiments' shared reporting helpers (experiments/topk_decoding/report.py) on synthetic rows."""

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "topk_decoding"))
import report  # noqa: E402


def rows(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    out = []
    for k in (None, 2, 0.01, 0.1):
        for sample in range(12):
            out.append({"task": "passkey", "length": 1024, "sample": sample, "indexer": "dense" if k is None else "exact",
                        "k": k, "score": float(rng.random() < 0.7), "recall": math.nan, "mass_recall": math.nan,
                        "context_tokens": 1000 + sample})
    return pd.DataFrame(out).assign(setting=lambda f: report.setting(f))


def test_keys_attended_reads_counts_and_ratios():
    frame = rows()
    assert report.keys_attended(frame[frame["k"] == 2]) == 2
    assert report.keys_attended(frame[frame["k"] == 0.1]) == pytest.approx(0.1 * (1000 + 5.5))
    assert math.isnan(report.keys_attended(frame[frame["indexer"] == "dense"]))


def test_accuracy_table_and_figure_with_counts_and_ratios_mixed(tmp_path):
    table = report.accuracy_table(rows().assign(model="m"), ["model", "task", "indexer", "k", "setting"])
    assert len(table) == 4 and (table["n"] == 12).all() and (table["low"] <= table["score"]).all()
    assert table["keys"].dropna().tolist() == pytest.approx([2, 10.055, 100.55])
    path = report.plot_accuracy_vs_k(table, tmp_path / "acc.png", hue="model", title="t")
    assert path.stat().st_size > 1000
    nll = table.assign(nll=table["score"])  # any value column, as the teacher-forced curves use
    assert report.plot_accuracy_vs_k(nll, tmp_path / "nll.png", hue="model", title="t", value="nll", ylim=None).exists()


def test_paired_difference_counts_changes():
    frame = rows()
    diff = report.paired_difference(frame, "setting", "exact k=2", "dense")
    assert diff["n"].iloc[0] == 12 and diff["changed_up"].iloc[0] + diff["changed_down"].iloc[0] <= 12
