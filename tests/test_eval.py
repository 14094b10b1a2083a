"""The eval harness end to end on a tiny random model: rows and columns, shared prefill == generate from scratch,
resumption, sharding (in process and with two torchrun processes), device_map loading, the CLI, bad input."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from topklab.runtime import single_thread
from topklab.decoding.topk_attention import topk_attention
from topklab.indexers.exact import Exact
from topklab.indexers.registry import REGISTRY
from topklab.models import tiny_model
from topklab.tasks import PromptCodec, make
from topklab.tasks import evaluate as ev
from topklab.tasks.cli import add_eval_arguments, run_eval
from topklab.tasks.evaluate import (
    COLUMNS,
    DecodeConfig,
    EvalConfig,
    Shard,
    configurations,
    decode,
    load_eval_model,
    prefill,
    read_results,
    run_evaluation,
)

pytest.importorskip("transformers")
pytest.importorskip("gensim")

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(model="tiny-llama", tasks=("passkey", "niah_single"), lengths=(2048,), samples=2,
             indexers=("dense", "exact", "oracle:p=0.5"), ks=(16,), max_new_tokens=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are latency-bound; extra threads only contend on a shared 2-core CI machine."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@dataclass(eq=False)
class HiddenExact(Exact):
    """A stand-in for a hidden-state indexer (exact inner products of attention-input hidden states)."""

    name = "test_hidden_exact"
    source = "hidden"


def _generate(model, ids, steps):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                         pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_configurations_are_canonical_and_resolve_per(monkeypatch):
    monkeypatch.setitem(REGISTRY, HiddenExact.name, HiddenExact)
    configs = configurations(["dense", "exact", "oracle:p=0.50", "dense", "test_hidden_exact"], [16, 0.25])
    assert [c.ident.split("|")[0] for c in configs] == ["dense", "exact", "exact", "oracle:p=0.5", "oracle:p=0.5",
                                                       "test_hidden_exact", "test_hidden_exact"]
    assert {c.per for c in configs if c.indexer in ("exact", "oracle:p=0.5")} == {"head"}
    assert {c.per for c in configs if c.hidden} == {"layer"}
    assert configs[0].dense and configs[0].k is None and configs[0].ident == "dense"
    assert configurations(["exact"], [8], per="group")[0].per == "group"
    with pytest.raises(ValueError, match="unknown indexer 'nope'"):
        configurations(["nope"], [8])
    with pytest.raises(ValueError, match="per must be one of"):
        configurations(["exact"], [8], per="token")
    with pytest.raises(ValueError, match="ratio"):
        configurations(["exact"], [1.5])
    kinds = configurations(["exact"], [1, 1.0, 1])  # one key and the whole context are not one configuration
    assert [(type(c.k), c.k) for c in kinds] == [(int, 1), (float, 1.0)]
    for bad in (dict(sinks=-1), dict(window=-2), dict(sinks=1.5)):
        with pytest.raises(ValueError, match="must be an int >= 0"):
            configurations(["exact"], [8], **bad)


def test_summary_keeps_configurations_of_one_k_apart():
    from topklab.tasks.evaluate import DecodeConfig, summarize

    one, whole = DecodeConfig("exact", 1, "head"), DecodeConfig("exact", 1.0, "head")
    rows = pd.DataFrame([dict(task="passkey", length=1024, indexer="exact", k=float(c.k), per="head", score=score,
                              recall=1.0, mass_recall=1.0, config=c.ident) for c, score in ((one, 0.0), (whole, 1.0))])
    summary = summarize(rows)
    assert len(summary) == 2 and sorted(summary.score) == [0.0, 1.0] and (summary.samples == 1).all()


def test_bad_answer_budget_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import topklab.tasks.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load_eval_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        evaluate.run_evaluation(evaluate.EvalConfig(model="tiny-llama", tasks=("passkey",), lengths=(1024,), samples=1,
                                                    max_new_tokens=0, out=str(tmp_path)))


@pytest.mark.parametrize("per,sinks,window", [("head", 0, 0), ("group", 2, 4), ("layer", 0, 0)])
def test_shared_prefill_then_decode_equals_generate_from_scratch(model, monkeypatch, per, sinks, window):
    """One dense prefill, deep-copied for each configuration, gives exactly what generate() gives per config."""
    monkeypatch.setitem(REGISTRY, HiddenExact.name, HiddenExact)
    steps = 6
    codec = PromptCodec(None)
    sample = make("passkey").sample(codec, 1024, 0, max_new_tokens=steps)
    ids = torch.tensor([sample.input_ids])
    specs = ["dense", "exact", "oracle:p=0.5"] + (["test_hidden_exact"] if per == "layer" else [])
    with torch.no_grad():
        logits, cache = prefill(model, ids)
        length = cache.get_seq_length()
        for config in configurations(specs, [16, 0.05], per=per, sinks=sinks, window=window):
            tokens, frame = decode(model, ids, logits, cache, config, steps, eos=set())
            assert cache.get_seq_length() == length  # the shared cache is untouched
            if config.dense:
                expected = _generate(model, ids, steps)
                assert frame is None
            else:
                with topk_attention(model, config.indexer, k=config.k, per=per, sinks=sinks, window=window):
                    expected = _generate(model, ids, steps)
                assert len(frame) == (steps - 1) * 2 * 4  # decode steps after the first x layers x heads
            assert tokens == expected, config.ident


def test_decode_stops_at_eos_like_generate(model):
    ids = torch.tensor([make("passkey").sample(PromptCodec(None), 1024, 1).input_ids])
    with torch.no_grad():
        logits, cache = prefill(model, ids)
        free = decode(model, ids, logits, cache, DecodeConfig("dense"), 6, eos=set())[0]
        stopped = decode(model, ids, logits, cache, DecodeConfig("dense"), 6, eos={free[2]})[0]
    assert stopped == free[: free.index(free[2]) + 1]


def test_run_writes_one_row_per_sample_and_configuration(tmp_path):
    results = run_evaluation(EvalConfig(**SMALL, out=str(tmp_path)))
    assert list(results.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert len(results) == 2 * 2 * 3  # tasks x samples x (dense, exact, oracle)
    assert results.groupby(["task", "length", "sample"]).size().eq(3).all()
    dense = results[results.indexer == "dense"]
    assert dense.k.isna().all() and dense[["recall", "mass_recall", "output_error"]].isna().all().all()
    exact = results[results.indexer == "exact"]
    assert (exact.recall == 1.0).all() and (exact.k == 16).all() and (exact.per == "head").all()
    assert exact.mass_recall.between(0, 1).all() and (exact.output_error > 0).all()
    assert (results[results.indexer == "oracle:p=0.5"].recall.round(6) == 0.5).all()
    assert results.score.between(0, 1).all() and (results.decode_steps <= 4).all()
    assert (results.context_tokens + 4 <= 2048).all() and (results.model == "tiny-llama").all()
    assert (results["rank"] == 0).all() and set(results.seed) == {0}
    merged = pd.read_parquet(tmp_path / "results.parquet")
    assert len(merged) == len(results) and (tmp_path / "config.json").is_file()


class Killed(Exception):
    """Stands for the process dying mid-run."""


def test_resumption_skips_finished_work_and_survives_a_crash(tmp_path, monkeypatch):
    config = EvalConfig(**SMALL, out=str(tmp_path))
    calls, crashed = [], []
    original = ev.evaluate_sample

    def crash_on_third(*args, **kwargs):
        calls.append(args[3].index)
        if len(calls) == 3 and not crashed:
            crashed.append(True)
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_sample", crash_on_third)
    with pytest.raises(Killed):
        run_evaluation(config)
    cells = sorted((tmp_path / "cells").iterdir())
    assert len(cells) == 2 and all(p.suffix == ".parquet" for p in cells)  # no temporary leftovers
    calls.clear()
    full = run_evaluation(config)
    assert len(calls) == 2 and len(full) == 12  # only the two unfinished samples ran
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    calls.clear()
    again = run_evaluation(config)
    assert calls == [] and {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()} == stamps
    pd.testing.assert_frame_equal(again, full)
    more = run_evaluation(EvalConfig(**{**SMALL, "ks": (16, 64)}, out=str(tmp_path)))
    assert len(calls) == 4 and len(more) == 20  # each sample decoded only the two new configurations
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    pd.testing.assert_frame_equal(more[more.k != 64].reset_index(drop=True), full, check_dtype=False)


def test_a_reused_folder_returns_only_this_runs_rows(tmp_path):
    """Cells of earlier settings stay on disk (a later run may want them) but are not this run's results."""
    run_evaluation(EvalConfig(**{**SMALL, "ks": (16, 64)}, out=str(tmp_path)))
    narrower = EvalConfig(**{**SMALL, "ks": (16,), "samples": 1, "max_new_tokens": 3}, out=str(tmp_path))
    results = run_evaluation(narrower)
    assert set(results.k.dropna()) == {16} and set(results["sample"]) == {0}
    assert set(results.max_new_tokens) == {3} and not results.duplicated(["sample_key", "config"]).any()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "results.parquet"), results)
    assert len(read_results(tmp_path)) > len(results)


def test_shards_are_disjoint_and_cover_the_work(tmp_path):
    config = EvalConfig(**{**SMALL, "indexers": ("dense",), "samples": 3}, out=str(tmp_path))
    parts = [run_evaluation(config, shard=Shard(rank, 2, rank)) for rank in (0, 1)]
    merged = read_results(tmp_path)
    keys = ["task", "length", "sample"]
    mine = [set(map(tuple, merged[merged["rank"] == r][keys].to_numpy().tolist())) for r in (0, 1)]
    assert mine[0] and mine[1] and not mine[0] & mine[1]
    assert mine[0] | mine[1] == {(t, 2048, i) for t in ("passkey", "niah_single") for i in range(3)}
    assert len(parts[1]) == len(merged) == 6


def test_two_torchrun_processes_shard_the_samples(tmp_path):
    """The same command under torchrun: two CPU ranks, disjoint shards, merged by rank 0."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "topklab.cli", "eval", "--model", "tiny-llama", "--tasks", "passkey", "--lengths", "2048",
               "--samples", "4", "--indexers", "dense", "exact", "--k", "16", "--max-new-tokens", "3",
               "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 8 and set(results["rank"]) == {0, 1}
    by_rank = results.groupby("rank")["sample"].agg(set)
    assert by_rank[0] == {0, 2} and by_rank[1] == {1, 3}
    assert len(list((out / "cells").glob("*.parquet"))) == 4


def test_device_map_loads_a_hugging_face_folder(tmp_path, model):
    pytest.importorskip("accelerate")
    model.save_pretrained(tmp_path / "tiny")
    loaded, tokenizer = load_eval_model(str(tmp_path / "tiny"), "cpu", torch.float32, device_map="auto")
    assert tokenizer is None and loaded is not model and next(loaded.parameters()).device.type == "cpu"
    ids = torch.tensor([make("passkey").sample(PromptCodec(None), 1024, 0).input_ids])
    with torch.no_grad():
        mine = decode(loaded, ids, *prefill(loaded, ids), DecodeConfig("dense"), 4, set())[0]
    assert mine == _generate(model, ids, 4)
    with pytest.raises(ValueError, match="fits on one device"):
        load_eval_model("tiny-llama", "cpu", torch.float32, device_map="auto")


def test_cli_parses_the_documented_command_and_runs(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--model", "tiny-llama", "--tasks", "passkey", "--lengths", "1024,2048", "--samples", "1",
                              "--indexers", "dense", "exact", "oracle:p=0.5", "--k", "16,0.05", "--per", "group",
                              "--max-new-tokens", "3", "--out", str(tmp_path)])
    assert args.ks == (16, 0.05) and args.lengths == (1024, 2048) and args.tasks == ("passkey",)
    assert run_eval(args) == 0
    printed = capsys.readouterr().out
    assert "oracle:p=0.5" in printed and "10 rows" in printed
    results = read_results(tmp_path)
    assert set(results.per) == {"", "group"} and sorted(set(results.k.dropna())) == [0.05, 16.0]
    for bad in (["--k", "0"], ["--k", "2.5"], ["--lengths", "x"], ["--tasks", ","]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_bad_configurations_fail_before_any_model_loads(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model should not load")

    monkeypatch.setattr(ev, "load_eval_model", no_loading)
    base = {**SMALL, "out": str(tmp_path)}
    with pytest.raises(ValueError, match="unknown task"):
        run_evaluation(EvalConfig(**{**base, "tasks": ("passkey", "nope")}))
    with pytest.raises(ValueError, match="unknown indexer"):
        run_evaluation(EvalConfig(**{**base, "indexers": ("dense", "nope")}))
    with pytest.raises(ValueError, match="lightning is a learned indexer and is not trained"):
        run_evaluation(EvalConfig(**{**base, "indexers": ("dense", "lightning")}))
    with pytest.raises(ValueError, match="samples must be >= 1"):
        run_evaluation(EvalConfig(**{**base, "samples": 0}))
    with pytest.raises(ValueError, match="single process"):
        run_evaluation(EvalConfig(**{**base, "device_map": "auto"}), shard=Shard(0, 2, 0))
    with pytest.raises(ValueError, match="RANK=2 must be in"):
        monkeypatch.setenv("RANK", "2")
        monkeypatch.setenv("WORLD_SIZE", "2")
        Shard.from_env()


def test_length_beyond_the_model_window_is_refused(tmp_path):
    with pytest.raises(ValueError, match="exceeds tiny-llama's window of 4096"):
        run_evaluation(EvalConfig(**{**SMALL, "lengths": (8192,)}, out=str(tmp_path)))
    with pytest.raises(ValueError, match="too short for task 'passkey'"):
        run_evaluation(EvalConfig(**{**SMALL, "lengths": (128,)}, out=str(tmp_path)))


@pytest.mark.slow
def test_smollm2_passkey_end_to_end(tmp_path):
    pytest.importorskip("gguf")
    results = run_evaluation(EvalConfig(model="smollm2", tasks=("passkey",), lengths=(1024,), samples=1,
                                        indexers=("dense", "exact"), ks=(64,), max_new_tokens=6, out=str(tmp_path)))
    assert len(results) == 2 and results.context_tokens.iloc[0] + 6 <= 1024
    assert results[results.indexer == "exact"].recall.eq(1.0).all()
    assert not math.isnan(results[results.indexer == "exact"].mass_recall.iloc[0])


def test_haystack_text_follows_the_model_unless_given(tmp_path):
    noise = tmp_path / "noise.txt"
    noise.write_text("The grass is green and the sky is blue; here we go, there and back again.\n" * 200)
    zoo = tmp_path / "zoo-model"
    zoo.mkdir()
    config = json.loads(Path("experiments/zoo/configs/zoo-s-noise-short.json").read_text())
    config["data"]["filler"] = str(noise)
    (zoo / "zoo.json").write_text(json.dumps(config))
    tasks = ("passkey", "vt")
    assert [t.filler for t in ev._tasks(ev.EvalConfig(model=str(zoo), tasks=tasks))] == [str(noise)] * 2
    assert [t.filler for t in ev._tasks(ev.EvalConfig(model=str(zoo), tasks=tasks, filler="wiki"))] == ["wiki"] * 2
    assert [t.filler for t in ev._tasks(ev.EvalConfig(model="tiny-llama", tasks=tasks))] == ["wiki"] * 2
    sample = ev._tasks(ev.EvalConfig(model="tiny-llama", tasks=("passkey",), filler=str(noise)))[0].sample(
        PromptCodec(None, vocab_size=258), 768, 0)
    assert "grass is green" in bytes(sample.input_ids).decode()
