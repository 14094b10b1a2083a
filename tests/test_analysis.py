"""Analysis: fidelity-accuracy correlation with a paired bootstrap over samples, attention entropy from traces,
figures and the markdown report, on synthetic tidy frames in the eval schema and on random traces."""

import argparse
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from topklab.analysis import correlation, entropy, report
from topklab.fidelity.traces import LayerTrace, TraceFile, save_trace

RESAMPLES = 300


def eval_rows(seed=0, samples=10, tasks=("passkey", "vt"), ks=(16, 64), oracle_ps=(0, 0.25, 0.5, 0.75, 1.0),
              indexers=(("ivf:nprobe=2", 0.55), ("hnsw:M=16", 0.8), ("lsh:tables=8", 0.3))):
    """Tidy rows in the eval schema: accuracy rises with recall through a per-sample difficulty threshold."""
    rng = np.random.default_rng(seed)
    rows = []
    for task in tasks:
        for sample in range(samples):
            difficulty = rng.uniform(0.05, 0.95)

            def add(indexer, k, level):
                if indexer == "dense":
                    recall = mass = error = np.nan
                    score = 1.0
                else:
                    recall = float(np.clip(level + rng.normal(0, 0.03), 0, 1))
                    mass = float(np.clip(0.3 + 0.6 * recall + rng.normal(0, 0.03), 0, 1))
                    error = 1.0 - mass
                    score = float(recall + rng.normal(0, 0.05) > difficulty)
                rows.append(dict(task=task, length=1024, sample=sample, seed=0, model="m", indexer=indexer, k=k,
                                 per="kv_head", score=score, prediction="", answer="[]", context_tokens=1000,
                                 decode_steps=4, recall=recall, mass_recall=mass, output_error=error, rank=0))

            add("dense", np.nan, 1.0)
            for k in ks:
                for p in oracle_ps:
                    add("oracle" if p == 1 else f"oracle:p={p:g}", k, p)
                for spec, level in indexers:
                    add(spec, k, level)
    return pd.DataFrame(rows)


# -- correlation ---------------------------------------------------------------------------------------------------

def test_pearson_and_spearman_match_scipy_vectorised():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 9))
    y = x + rng.normal(size=(4, 3, 9))
    x[0, 0, :4] = 1.0  # ties
    r, rho = correlation.pearson(x, y), correlation.spearman(x, y)
    for i in range(4):
        for j in range(3):
            assert r[i, j] == pytest.approx(stats.pearsonr(x[i, j], y[i, j]).statistic, abs=1e-12)
            assert rho[i, j] == pytest.approx(stats.spearmanr(x[i, j], y[i, j]).statistic, abs=1e-12)
    assert correlation.spearman(x, y, axis=0)[1, 1] == pytest.approx(stats.spearmanr(x[:, 1, 1], y[:, 1, 1]).statistic)
    assert np.isnan(correlation.pearson(np.ones(5), np.arange(5.0)))


def test_indexer_kind():
    assert correlation.indexer_kind("dense")[0] == "dense"
    assert correlation.indexer_kind("oracle") == ("oracle", "oracle", 1.0)
    assert correlation.indexer_kind("oracle:p=0.3,fill=next") == ("oracle", "oracle:fill=next", 0.3)
    kind, curve, p = correlation.indexer_kind("ivf:nlist=64,nprobe=2")
    assert (kind, curve) == ("indexer", "ivf:nlist=64,nprobe=2") and math.isnan(p)


def test_repeated_sample_under_one_configuration_is_refused():
    """Two runs' rows for one sample (say, two answer budgets in one folder) must not be averaged silently."""
    rows = eval_rows(samples=4)
    with pytest.raises(ValueError, match="repeat a sample under one configuration"):
        correlation.configurations(pd.concat([rows, rows.iloc[:3]], ignore_index=True), n_resamples=RESAMPLES)


def test_configurations_means_and_intervals():
    rows = eval_rows()
    table = correlation.configurations(rows, n_resamples=RESAMPLES)
    expected = rows.fillna({"k": -1}).groupby(["indexer", "k"])[["score", "recall", "mass_recall"]].mean()
    for _, row in table.fillna({"k": -1}).iterrows():
        ref = expected.loc[(row["indexer"], row["k"])]
        assert row["accuracy"] == pytest.approx(ref["score"])
        assert row["samples"] == 20
        if row["kind"] == "dense":
            assert np.isnan(row["recall"])
        else:
            assert row["recall"] == pytest.approx(ref["recall"])
            assert row["accuracy_low"] - 1e-12 <= row["accuracy"] <= row["accuracy_high"] + 1e-12
    oracle = table[table["kind"] == "oracle"]
    assert sorted(oracle["p"].unique()) == [0, 0.25, 0.5, 0.75, 1.0] and set(oracle["curve"]) == {"oracle"}


def test_bootstrap_is_stratified_by_task():
    # task A always right, task B always wrong: every stratified replicate keeps the 50/50 mix, so the CI is a point
    rows = eval_rows(samples=6)
    rows["score"] = (rows["task"] == "passkey").astype(float)
    table = correlation.configurations(rows, n_resamples=RESAMPLES)
    assert np.allclose(table[["accuracy", "accuracy_low", "accuracy_high"]], 0.5)


def test_correlation_estimates_are_over_configuration_means():
    rows = eval_rows()
    table = correlation.correlate(rows, n_resamples=RESAMPLES)
    means = rows[rows.indexer != "dense"].groupby(["indexer", "k"])[["score", "recall", "mass_recall",
                                                                    "output_error"]].mean().reset_index()
    for scope, part in [("all", means), ("k=16", means[means.k == 16]), ("k=64", means[means.k == 64])]:
        for metric in correlation.FIDELITY_METRICS:
            got = table.set_index(["scope", "metric", "method"]).sort_index().loc[(scope, metric)]
            assert got.loc["spearman", "r"] == pytest.approx(stats.spearmanr(part[metric], part["score"]).statistic)
            assert got.loc["pearson", "r"] == pytest.approx(stats.pearsonr(part[metric], part["score"]).statistic)
            assert (got["configs"] == len(part)).all() and (got["samples"] == 20).all()
    assert set(table["scope"]) == {"all", "k=16", "k=64"}
    assert (table["ci_low"] <= table["r"] + 1e-9).all() and (table["r"] <= table["ci_high"] + 1e-9).all()
    # recall drives accuracy here: strongly positive with a CI clear of 0; output error the mirror image
    recall = table[(table.metric == "recall") & (table.scope == "all")]
    assert (recall["ci_low"] > 0.5).all()
    assert (table.loc[table.metric == "output_error", "r"] < 0).all()
    assert np.allclose(table.groupby(["scope", "method"])["p_best"].sum(), 1.0)


def test_best_predictor_finds_the_informative_metric():
    rows = eval_rows(samples=12)
    rng = np.random.default_rng(5)
    fidelity = rows["indexer"] != "dense"
    rows.loc[fidelity, "mass_recall"] = rng.uniform(0, 1, fidelity.sum())  # uninformative
    table = correlation.correlate(rows, metrics=("recall", "mass_recall"), n_resamples=RESAMPLES)
    best = correlation.best_predictor(table)
    assert set(best["metric"]) == {"recall"}
    assert (best.loc[best.scope == "all", "p_best"] > 0.95).all()
    noise = table[(table.metric == "mass_recall") & (table.scope == "all")]
    assert (noise["ci_low"] < 0.5).all()


def test_constant_accuracy_gives_undefined_correlations_not_errors():
    rows = eval_rows(samples=3).assign(score=0.0)
    table = correlation.correlate(rows, n_resamples=100)
    assert table["r"].isna().all() and (table["p_best"] == 0).all()
    assert correlation.best_predictor(table).empty


def test_correlate_by_task_equals_separate_calls():
    rows = eval_rows(samples=6)
    by = correlation.correlate(rows, by=["task"], n_resamples=100)
    alone = correlation.correlate(rows[rows.task == "vt"], n_resamples=100)
    mine = by[by.task == "vt"].drop(columns="task").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, alone)


def test_incomplete_samples_are_dropped_and_bad_input_is_explained(caplog):
    rows = eval_rows(samples=6)
    gone = (rows.task == "vt") & (rows["sample"] == 0) & (rows.indexer == "oracle:p=0.5") & (rows.k == 16)
    with caplog.at_level(logging.WARNING):
        table = correlation.correlate(rows[~gone], n_resamples=100)
    assert (table["samples"] == 11).all() and "dropping 1 of 12 samples" in caplog.text
    unrecorded = rows.copy()
    unrecorded.loc[(rows.task == "passkey") & (rows["sample"] == 1) & (rows.indexer == "hnsw:M=16"), "recall"] = np.nan
    assert (correlation.correlate(unrecorded, metrics=("recall",), n_resamples=100)["samples"] == 11).all()
    with pytest.raises(ValueError, match="lack column"):
        correlation.correlate(rows.drop(columns="score"))
    with pytest.raises(ValueError, match="at least 3"):
        correlation.correlate(rows[rows.indexer.isin(["dense", "oracle", "oracle:p=0"]) & (rows.k != 64)])
    with pytest.raises(ValueError, match="no fidelity was recorded"):
        correlation.correlate(rows.assign(recall=np.nan, mass_recall=np.nan, output_error=np.nan))


def test_oracle_gap_hand_computed():
    # oracle accuracy 0 at p=0 and 1 at p=1 (a straight line); an indexer at recall 0.5 scoring 0.75 sits 0.25 above
    rows = []
    for sample in range(8):
        for spec, recall, score in [("oracle:p=0", 0.0, 0.0), ("oracle", 1.0, 1.0), ("x", 0.5, float(sample < 6)),
                                    ("twin", 0.5, float(sample % 2))]:
            rows.append(dict(task="t", length=1, sample=sample, seed=0, model="m", indexer=spec, k=8, per="h",
                             score=score, recall=recall, mass_recall=recall, output_error=1 - recall))
    gaps = correlation.oracle_gap(pd.DataFrame(rows), n_resamples=RESAMPLES).set_index("indexer")
    assert gaps.loc["x", "oracle_accuracy"] == pytest.approx(0.5)
    assert gaps.loc["x", "gap"] == pytest.approx(0.25)
    assert gaps.loc["x", "gap_low"] <= 0.25 <= gaps.loc["x", "gap_high"] and gaps.loc["x", "gap_high"] > 0.25
    assert gaps.loc["twin", "gap"] == pytest.approx(0.0)


def test_oracle_gap_is_paired_across_configurations():
    # an indexer that copies the oracle at p=0.5 sample by sample has gap exactly 0 in every paired replicate
    rows = eval_rows(samples=8, ks=(16,), indexers=())
    twin = rows[rows.indexer == "oracle:p=0.5"].assign(indexer="copycat")
    gaps = correlation.oracle_gap(pd.concat([rows, twin]), n_resamples=RESAMPLES)
    assert gaps[["gap", "gap_low", "gap_high"]].abs().max().max() < 1e-9
    with pytest.raises(ValueError, match="no indexer configuration has an oracle curve"):
        correlation.oracle_gap(twin.assign(k=99).pipe(lambda t: pd.concat([rows, t])))


def test_interp_rows_matches_numpy():
    rng = np.random.default_rng(3)
    xp = rng.uniform(0, 1, (50, 6))
    fp = rng.normal(size=(50, 6))
    x = rng.uniform(-0.2, 1.2, 50)  # some outside the range: clamped like np.interp
    got = correlation._interp_rows(x, xp, fp)
    for i in range(50):
        order = np.argsort(xp[i])
        assert got[i] == pytest.approx(np.interp(x[i], xp[i][order], fp[i][order]))


# -- entropy ---------------------------------------------------------------------------------------------------------

def test_entropy_from_logits_is_safe_and_exact(rng):
    logits = torch.randn(5, 7, 40, generator=rng) * 3
    probs = torch.softmax(logits.double(), -1)
    assert torch.allclose(entropy.entropy_from_logits(logits), -(probs * probs.log()).sum(-1).float(), atol=1e-5)
    assert entropy.entropy_from_logits(torch.zeros(3, 64)) == pytest.approx(math.log(64), rel=1e-6)
    extreme = torch.tensor([[1e4, 0.0, -1e4], [-math.inf, 2.0, -math.inf]])
    assert torch.equal(entropy.entropy_from_logits(extreme), torch.zeros(2))
    masked = logits.clone()
    masked[..., 10:] = -math.inf  # masked keys contribute nothing: the entropy of the first 10 alone
    assert torch.allclose(entropy.entropy_from_logits(masked), entropy.entropy_from_logits(logits[..., :10]), atol=1e-5)
    with pytest.raises(ValueError, match="finite logit"):
        entropy.entropy_from_logits(torch.full((2, 4), -math.inf))


def test_topk_mass(rng):
    logits = torch.randn(3, 30, generator=rng)
    probs = torch.softmax(logits, -1).sort(-1, descending=True).values
    got = entropy.topk_mass(logits, [1, 5, 30, 100])
    assert torch.allclose(got[:, 0], probs[:, 0]) and torch.allclose(got[:, 1], probs[:, :5].sum(-1))
    assert torch.allclose(got[:, 2:], torch.ones(3, 2))
    with pytest.raises(ValueError, match="positive"):
        entropy.topk_mass(logits, [0])


def random_trace(rng, layer=3, batch=2, heads=4, kv_heads=2, length=24, prompt_len=18, dim=8):
    q = torch.randn(batch, heads, length, dim, generator=rng) * 2
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=rng) for _ in range(2))
    return LayerTrace(layer, q, k, v, None, dim ** -0.5, prompt_len)


def test_layer_entropy_against_brute_force(rng):
    trace = random_trace(rng)
    rows = entropy.layer_entropy(trace, ks=(4, 16))
    assert len(rows) == 2 * 4 * 6 and rows["entropy"].notna().all()
    for _, row in rows.sample(12, random_state=0).iterrows():
        t, h, b = int(row["position"]), int(row["head"]), int(row["seq"])
        scores = trace.k[b, h // 2, : t + 1].double() @ trace.q[b, h, t].double() * trace.scale
        p = torch.softmax(scores, -1)
        h_ref = float(-(p * p.log()).sum())
        assert row["kv_head"] == h // 2 and row["context"] == t + 1 and row["layer"] == 3
        assert row["entropy"] == pytest.approx(h_ref, rel=1e-4)
        assert row["norm_entropy"] == pytest.approx(h_ref / math.log(t + 1), rel=1e-4)
        assert row["mass_at_k_4"] == pytest.approx(float(p.sort(descending=True).values[:4].sum()), rel=1e-4)
    with pytest.raises(ValueError, match="no decode positions"):
        entropy.layer_entropy(random_trace(rng, prompt_len=24))


def test_trace_entropy_labels_and_summaries(tmp_path, rng):
    traces = {i: random_trace(rng, layer=i, batch=1) for i in (0, 2)}
    path = save_trace(tmp_path / "t.safetensors", traces, torch.zeros(1, 24, dtype=torch.long),
                      info={"model": "tiny", "title": "Doc"})
    rows = entropy.trace_entropy(TraceFile(path), ks=(2, 8))
    assert list(rows.columns[:4]) == ["model", "task", "length", "sample"]
    assert set(rows["model"]) == {"tiny"} and set(rows["sample"]) == {"Doc"} and set(rows["layer"]) == {0, 2}
    relabelled = entropy.trace_entropy(TraceFile(path), ks=(2,), layers=[2], labels={"task": "passkey", "sample": 7})
    assert set(relabelled["task"]) == {"passkey"} and set(relabelled["layer"]) == {2}
    summary = entropy.head_summary(rows)
    assert len(summary) == 2 * 4 and (summary["positions"] == 6).all()
    means = rows.groupby(["layer", "head"])["mass_at_k_8"].mean().to_numpy()
    assert np.allclose(summary["lost_at_k_8"], 1 - means)


def test_entropy_mass_relation_and_shift():
    rng = np.random.default_rng(0)
    rows = []
    for model, offset in [("base", 0.0), ("topk-sft", -0.1)]:
        for sample in range(5):
            for layer in range(3):
                for head in range(4):
                    level = 0.2 + 0.15 * head + 0.05 * layer  # lost mass rises with entropy across heads
                    norm = level + offset + rng.normal(0, 0.01)
                    rows.append(dict(model=model, task="t", length=100, sample=sample, seq=0, layer=layer, head=head,
                                     position=99, context=100, entropy=norm * math.log(100), norm_entropy=norm,
                                     mass_at_k_16=1 - level))
    rows = pd.DataFrame(rows)
    relation = entropy.entropy_mass_relation(rows, n_resamples=RESAMPLES)
    assert set(relation["model"]) == {"base", "topk-sft"} and (relation["heads"] == 12).all()
    assert (relation["rho"] > 0.9).all() and (relation["ci_low"] > 0.5).all()
    shift = entropy.entropy_shift(rows, "base", n_resamples=RESAMPLES)
    overall = shift[shift["layer"].isna()].iloc[0]
    paired = rows.pivot_table(index="sample", columns="model", values="norm_entropy", aggfunc="mean")
    assert overall["shift"] == pytest.approx((paired["topk-sft"] - paired["base"]).mean())
    assert overall["ci_low"] < -0.09 and overall["ci_high"] > -0.11 and overall["ci_high"] < 0
    assert len(shift) == 4 and overall["prompts"] == 5
    with pytest.raises(ValueError, match="baseline model"):
        entropy.entropy_shift(rows, "nope")


# -- figures and report ----------------------------------------------------------------------------------------------

def recall_rows(rng):
    """A small stand-in for `topklab recall`'s results.parquet (same columns)."""
    rows = []
    for spec, level, cost in [("exact", 1.0, 100.0), ("oracle:p=0.5", 0.5, 100.0), ("ivf:nprobe=2", 0.6, 20.0)]:
        for k in (4, 16):
            n = 2 * 2 * 3
            rows.append(pd.DataFrame({
                "model": "tiny", "trace": np.repeat(["a", "b"], 6), "indexer": spec, "family": spec.split(":")[0],
                "seq": 0, "head": np.tile([0, 1, 0, 1, 0, 1], 2), "kv_head": 0, "layer": np.tile([0, 0, 0, 1, 1, 1], 2),
                "position": np.tile([7, 8, 9], 4), "k": k, "recall": np.clip(level + rng.normal(0, 0.02, n), 0, 1),
                "mass_recall": rng.uniform(0.3, 1, n), "kl": rng.uniform(0, 1, n), "output_error": rng.uniform(0, 1, n),
                "bytes_read": cost, "keys_scored": cost / 4, "index_bytes": 0, "build_s": 0.0,
                "search_us": 1.0, "context": 10}))
    return pd.concat(rows, ignore_index=True)


def test_report_end_to_end(tmp_path):
    torch_rng = torch.Generator().manual_seed(0)
    (tmp_path / "eval").mkdir()
    eval_rows(samples=5).to_parquet(tmp_path / "eval" / "results.parquet")
    cells = tmp_path / "eval-running" / "cells"  # an eval still in progress: only cells, recording off
    cells.mkdir(parents=True)
    eval_rows(samples=3, ks=(16,)).assign(recall=np.nan, mass_recall=np.nan, output_error=np.nan) \
        .to_parquet(cells / "a.parquet")
    (tmp_path / "recall").mkdir()
    recall_rows(np.random.default_rng(0)).to_parquet(tmp_path / "recall" / "results.parquet")
    rows = entropy.layer_entropy(random_trace(torch_rng), ks=(4, 16)).assign(model="tiny", task="t", length=24,
                                                                             sample=0)
    both = pd.concat([rows, rows.assign(model="sft", norm_entropy=rows["norm_entropy"] * 0.9)])
    (tmp_path / "entropy").mkdir()
    both.to_parquet(tmp_path / "entropy" / entropy.ENTROPY_FILE)

    parser = argparse.ArgumentParser()
    report.add_report_arguments(parser)
    assert report.run_report(parser.parse_args([str(tmp_path), "--resamples", "100"])) == 0
    text = (tmp_path / "report.md").read_text()
    for heading in ["Downstream accuracy and fidelity: `eval`", "Downstream accuracy and fidelity: `eval-running`",
                    "Indexer recall on real attention: `recall`", "Attention entropy at decode positions: `entropy`",
                    "Entropy shift against `sft`", "Best predictor"]:
        assert heading in text
    assert "_Not computed: no fidelity was recorded" in text
    links = [line[line.index("(") + 1: -1] for line in text.splitlines() if line.startswith("![")]
    assert len(links) == 9  # eval 4, recall 2, entropy 3; the eval without fidelity explains its missing figure
    assert "_Figure fidelity-vs-accuracy not drawn" in text
    for link in links:
        image = tmp_path / link
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 5_000
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no results"):
        report.write_report(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no results folder"):
        report.write_report(tmp_path / "missing")


def test_report_shows_the_config_ident_only_where_configurations_look_alike():
    from topklab.analysis.report import _config_needed

    rows = pd.DataFrame(dict(indexer=["exact", "exact", "oracle:p=0.5"], k=[16.0, 16.0, 16.0], per="head",
                             config=["exact|k=16|sinks=0", "exact|k=16|sinks=4", "oracle|k=16|sinks=0"]))
    assert _config_needed(rows) and not _config_needed(rows.iloc[1:]) and not _config_needed(rows.drop(columns="config"))


def test_report_module_entry_point(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    eval_rows(samples=3, ks=(16,)).to_parquet(tmp_path / "eval" / "results.parquet")
    assert report.main([str(tmp_path), "--out", str(tmp_path / "r" / "out.md"), "--resamples", "50"]) == 0
    assert (tmp_path / "r" / "out.md").is_file() and "out.md" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path / "missing")])
    assert stop.value.code == 2


def test_markdown_table():
    frame = pd.DataFrame({"name": ["a|b", None], "whole": [1.0, np.nan], "frac": [0.12345, 2.0],
                          "count": pd.array([3, pd.NA], dtype="Int64")})
    assert report.markdown_table(frame).splitlines() == [
        "| name | whole | frac | count |", "| --- | --- | --- | --- |",
        "| a\\|b | 1 | 0.123 | 3 |", "|  |  | 2.000 |  |"]


def test_task_entropy_on_task_prompts(tmp_path):
    from topklab.models import tiny_model

    model = tiny_model("llama")
    rows = entropy.task_entropy(model, None, tasks=("passkey",), lengths=(700,), samples=2, decode_steps=3, ks=(4,))
    assert list(rows.columns[:4]) == list(entropy.LABEL_KEYS)
    assert set(rows["task"]) == {"passkey"} and set(rows["sample"]) == {0, 1} and set(rows["layer"]) == {0, 1}
    # 2 prompts x 2 layers x 4 heads x 2 decode positions (the first answer token comes from the prefill)
    assert len(rows) == 2 * 2 * 4 * 2 and rows["norm_entropy"].between(0, 1 + 1e-6).all()
    assert (rows.groupby("sample")["context"].min() > 400).all()
    noise = tmp_path / "noise.txt"
    noise.write_text("The grass is green and the sky is blue; here we go, there and back again.\n" * 200)
    on_noise = entropy.task_entropy(model, None, tasks=("passkey",), lengths=(700,), samples=2, decode_steps=3,
                                    ks=(4,), filler=str(noise))
    assert len(on_noise) == len(rows) and not on_noise["entropy"].equals(rows["entropy"])  # other prompts
    with pytest.raises(ValueError, match="decode_steps"):
        entropy.task_entropy(model, None, decode_steps=1)


def test_single_k_has_one_scope():
    table = correlation.correlate(eval_rows(samples=4, ks=(16,)), n_resamples=100)
    assert set(table["scope"]) == {"all"} and len(table) == 6
