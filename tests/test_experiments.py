"""The experiments' shared reporting helpers (experiments/topk_decoding/report.py) on synthetic rows, and what the
experiments reuse from earlier runs (cached rows, fine-tuned checkpoints) on tiny models."""

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS / "topk_decoding"))
import report  # noqa: E402

from topklab.models import tiny_model  # noqa: E402
from topklab.tasks.evaluate import configurations  # noqa: E402


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


def experiment(name: str):
    """experiments/NAME/run.py as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_run", EXPERIMENTS / name / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cached_cells_are_keyed_by_everything_the_rows_depend_on(tmp_path):
    model, configs = tiny_model("llama"), configurations(["dense"], [4])

    def run(filler=None, evaluate=report.evaluate, **kwargs):
        tasks = report.build_tasks(["passkey"], filler)
        return evaluate(model, None, "m", tasks, [400], 1, configs, tmp_path, **kwargs)

    first = run(seed=0)
    assert run(seed=1)["seed"].tolist() == [1]
    assert first["decode_steps"].tolist() != [3] and run(seed=0, max_new_tokens=3)["decode_steps"].tolist() == [3]
    run(filler=str(EXPERIMENTS / "zoo" / "noise_filler.txt"))  # another haystack
    run(seed=0, model_key="another checkpoint")  # e.g. an arm re-fine-tuned from another base
    assert len(list((tmp_path / "cells").glob("*.parquet"))) == 5  # one cell per distinct setting
    pd.testing.assert_frame_equal(run(seed=0), first, check_dtype=False)  # the same settings reuse the cell
    forced = [run(seed=seed, evaluate=report.evaluate_teacher_forced) for seed in (0, 1)]
    assert [f["seed"].tolist() for f in forced] == [[0], [1]]


def test_sft_arms_retrain_when_half_written_or_trained_otherwise(tmp_path, monkeypatch):
    import topklab.training.topk_sft as sft

    run = experiment("topk_sft")
    args = argparse.Namespace(dense_sft=None, topk_sft=None, device="cpu", tasks="passkey", train_lengths="400",
                              data_seed=2, filler=None, train_k="8", steps=1, batch_size=1, lr=1e-4, warmup=0, seed=0)
    folder = tmp_path / "checkpoints" / "topk-sft"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after the weights were written")

    with monkeypatch.context() as patch:
        patch.setattr(sft, "write_text", killed)
        with pytest.raises(KeyboardInterrupt):
            run.arm_checkpoint("topk-sft", "tiny-llama", args, tmp_path)
    assert not folder.exists()
    steps = lambda: json.loads((folder / "training.json").read_text())["train"]["steps"]  # noqa: E731
    assert run.arm_checkpoint("topk-sft", "tiny-llama", args, tmp_path) == str(folder) and steps() == 1
    args.steps = 2
    run.arm_checkpoint("topk-sft", "tiny-llama", args, tmp_path)
    assert steps() == 2
    monkeypatch.setattr(run, "finetune", killed)  # the same settings again: reused, not retrained
    assert run.arm_checkpoint("topk-sft", "tiny-llama", args, tmp_path) == str(folder)


def test_entropy_rows_and_checkpoints_follow_the_config(tmp_path):
    from topklab.training.zoo import config_from_dict, train_zoo_model

    run = experiment("entropy")
    base = train_zoo_model(config_from_dict({
        "name": "tiny", "model": {"layers": 1, "hidden": 32, "heads": 4, "kv_heads": 2, "intermediate": 64,
                                  "max_position": 1024},
        "data": {"tasks": ["passkey"], "lengths": [700]}, "train": {"steps": 1, "batch_size": 1, "warmup": 0}}),
        tmp_path / "base")
    config = {"model": str(base), "device": "cpu", "out": str(tmp_path / "results"),
              "entropy": {"tasks": ["passkey"], "lengths": [700], "samples": 1, "decode_steps": 2, "layers": "all",
                          "ks": [4]},
              "finetune": {"tasks": ["passkey"], "lengths": [700], "steps": 1, "batch_size": 1, "lr": 1e-4,
                           "warmup": 0, "topk_k": 8, "seed": 0}}
    assert sorted(run.entropy_rows(config, None)["sample"].unique()) == [0]
    config["entropy"].update(samples=2, ks=[4, 8])
    rows = run.entropy_rows(config, None)
    assert sorted(rows["sample"].unique()) == [0, 1] and "mass_at_k_8" in rows

    checkpoint = tmp_path / "results" / "base-dense-sft"
    dense = run.entropy_rows(config, "dense")
    config["finetune"]["steps"] = 2
    retrained = run.entropy_rows(config, "dense")
    assert json.loads((checkpoint / "training.json").read_text())["train"]["steps"] == 2
    assert not retrained["entropy"].equals(dense["entropy"])
    assert len(list((tmp_path / "results" / "rows").glob("*.parquet"))) == 4
