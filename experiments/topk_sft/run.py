"""Claim 2: Top-k decoding accuracy of a normally trained vs a Top-k fine-tuned model, across k.

    bash experiments/zoo/run.sh && python experiments/topk_sft/run.py --samples 50   # arms fine-tuned on a GPU
    python experiments/topk_sft/run.py --base results/zoo/zoo-s --steps 40 --batch-size 4  # both arms fine-tuned here

Two arms start from the same base model and see the same data, steps and seed; they differ only in the attention
of the fine-tuning forward pass: dense (the control) or exact Top-k at ``--train-k`` per query head (the study's
Top-k SFT). Both are then decoded with dense attention and with exact Top-k at each ``--eval-k`` (prefill dense).
The question is whether Top-k decoding loses less accuracy after Top-k SFT, so the key numbers are the paired
differences (same samples) Top-k SFT minus dense SFT at each k. Greedy task scores are coarse on few samples, so
each arm is also scored teacher-forced: the reference answer's NLL under dense and under Top-k decoding (one pass,
dense prompt, Top-k answer rows; equal to step-by-step Top-k decoding) and the "consistency gap" NLL(Top-k) -
NLL(dense), compared between the arms per sample. Writes OUT/results.parquet, OUT/teacher_forced.parquet,
OUT/summary.csv, OUT/paired_topk_vs_dense_sft.csv, OUT/teacher_forced_gaps.csv, OUT/summary.md and
OUT/accuracy_vs_k.png; re-running reuses checkpoints and finished samples.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "topk_decoding"))
from report import (  # noqa: E402
    accuracy_by_task,
    bootstrap_mean,
    build_tasks,
    evaluate,
    evaluate_teacher_forced,
    keys_attended,
    markdown,
    paired_difference,
    parse_k,
    per_scope,
    plot_accuracy_vs_k,
    set_threads,
    setting,
    with_interval,
    write_summary,
)

from topklab.io import digest, write_table, write_text  # noqa: E402
from topklab.tasks.evaluate import configurations  # noqa: E402
from topklab.training.reuse import reusable_checkpoint  # noqa: E402
from topklab.training.topk_sft import (  # noqa: E402
    TaskData,
    TopkSpec,
    TrainConfig,
    default_filler,
    default_tasks,
    finetune,
    load_trainable,
)
from topklab.training.zoo import (  # noqa: E402
    is_zoo_checkpoint,
    load_config,
    load_zoo_model,
    train_zoo_model,
    zoo_config_of,
)

ARMS = ("dense-sft", "topk-sft")
log = logging.getLogger("experiments.topk_sft")


def base_model(args, out: Path) -> str:
    """The base checkpoint: the one `experiments/zoo/run.sh` fine-tuned (``auto``, its arms with it), a checkpoint
    folder, or a zoo model trained here from a config file."""
    if args.base == "auto":
        found = sorted(p for p in Path("results/zoo").glob("*-topk-sft")
                       if Path(str(p).removesuffix("-topk-sft") + "-dense-sft").is_dir())
        if not found:
            raise SystemExit("no fine-tuned zoo arms under results/zoo: run `bash experiments/zoo/run.sh` on a GPU, or "
                             "pass --base CHECKPOINT (fine-tuned here) or --base experiments/zoo/configs/NAME.toml")
        base = str(found[-1]).removesuffix("-topk-sft")
        args.dense_sft, args.topk_sft = args.dense_sft or f"{base}-dense-sft", args.topk_sft or f"{base}-topk-sft"
        return base
    if not args.base.endswith((".json", ".toml")):
        return args.base
    config = load_config(args.base)
    folder = out / "checkpoints" / config.name
    # missing, or from another config (compared as JSON: a dataclass's == takes k = 1 for the ratio 1.0)
    if not (is_zoo_checkpoint(folder) and digest(zoo_config_of(folder).to_dict()) == digest(config.to_dict())):
        log.info("training zoo model %s into %s", args.base, folder)
        train_zoo_model(config, folder, args.device)
    return str(folder)


def arm_checkpoint(arm: str, base: str, args, out: Path) -> str:
    """A fine-tuned arm: given on the command line, an earlier run's fine-tune of ``base`` with the same settings, or
    fine-tuned now."""
    given = getattr(args, arm.replace("-", "_"))
    if given:
        return given
    folder = out / "checkpoints" / arm
    data = TaskData(tuple(args.tasks.split(",")), tuple(int(n) for n in args.train_lengths.split(",")), "answer",
                    data_seed=args.data_seed, filler=args.filler)
    topk = TopkSpec(parse_k(args.train_k)) if arm == "topk-sft" else None
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, seed=args.seed,
                         topk=topk, log_every=10)
    if not reusable_checkpoint(folder, base, data, config):
        model, tokenizer = load_trainable(base, args.device)
        finetune(model, tokenizer, data, config, folder, desc=arm)
    return str(folder)


def load(path: str, device: str):
    if is_zoo_checkpoint(path):
        return load_zoo_model(path, device=device)
    return load_trainable(path, device)


def likelihood_summary(forced: pd.DataFrame, out: Path, seed: int) -> str:
    """Teacher-forced answer NLL per arm and setting, and the consistency gap: how much Top-k decoding raises the
    NLL over dense decoding (paired per sample), per arm and Top-k SFT minus dense SFT."""
    forced = forced.assign(setting=setting(forced))
    wide = forced.pivot_table(index=["arm", "task", "length", "sample"], columns="setting", values="nll")
    rows = []
    for name in [c for c in wide.columns if c != "dense"]:
        gap = (wide[name] - wide["dense"]).rename("gap").reset_index()
        for arm in ARMS:
            values = gap[gap["arm"] == arm]["gap"].dropna().to_numpy()
            low, high = bootstrap_mean(values, seed)
            rows.append({"setting": name, "arm": arm, "n": len(values), "nll_gap": values.mean(), "low": low,
                         "high": high})
        both = gap.pivot_table(index=["task", "length", "sample"], columns="arm", values="gap").dropna()
        diff = (both["topk-sft"] - both["dense-sft"]).to_numpy()
        low, high = bootstrap_mean(diff, seed)
        rows.append({"setting": name, "arm": "topk-sft minus dense-sft", "n": len(diff), "nll_gap": diff.mean(),
                     "low": low, "high": high})
    gaps = pd.DataFrame(rows)
    means = forced.groupby(["arm", "setting"], sort=False).agg(n=("nll", "size"), nll=("nll", "mean"),
                                                               token_accuracy=("token_accuracy", "mean"),
                                                               exact=("exact", "mean")).reset_index()
    curves = []
    for (arm, indexer, k), group in forced.assign(task="all").groupby(["arm", "indexer", "k"], dropna=False):
        low, high = bootstrap_mean(group["nll"].to_numpy(), seed)
        curves.append({"model": arm, "task": "all", "indexer": indexer, "k": k, "nll": group["nll"].mean(),
                       "low": low, "high": high, "n": len(group), "keys": keys_attended(group)})
    plot_accuracy_vs_k(pd.DataFrame(curves), out / "answer_nll_vs_k.png", hue="model", value="nll", ylim=None,
                       title="Teacher-forced answer NLL (nats/token) under Top-k decoding")
    write_table(gaps, out / "teacher_forced_gaps.csv")
    write_table(means, out / "teacher_forced_means.csv")
    shown = gaps.assign(**{"NLL(Top-k) - NLL(dense) [95% CI]": with_interval(gaps, "nll_gap")})
    return (f"Teacher-forced answers (mean per-token NLL in nats; token accuracy = argmax hits)\n\n{markdown(means)}"
            f"\n\nConsistency gap, paired per sample\n\n"
            f"{markdown(shown[['setting', 'arm', 'n', 'NLL(Top-k) - NLL(dense) [95% CI]']])}\n")


def summarise(results: pd.DataFrame, out: Path, title: str, seed: int) -> str:
    results = results.assign(setting=setting(results))
    table = accuracy_by_task(results, ["arm", "task", "indexer", "k", "setting"], seed)
    paired = pd.concat([per_scope(results[results["setting"] == name],
                                  lambda frame: paired_difference(frame, "arm", "topk-sft", "dense-sft", seed=seed))
                        .assign(setting=name) for name in dict.fromkeys(results["setting"])], ignore_index=True)
    return write_summary(out, title, table, paired, name="arm", diff_label="Top-k SFT minus dense SFT [95% CI]",
                         diffs_file="paired_topk_vs_dense_sft.csv",
                         headings=("Accuracy per arm and decoding configuration",
                                   "Paired difference, same samples and decoding configuration"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="auto",
                        help="'auto' (the arms experiments/zoo/run.sh fine-tuned on the GPU), a checkpoint folder or "
                             "'smollm2' (both arms fine-tuned here), or a zoo config to train first")
    parser.add_argument("--dense-sft", help="use this checkpoint as the dense-SFT arm instead of fine-tuning")
    parser.add_argument("--topk-sft", help="use this checkpoint as the Top-k-SFT arm instead of fine-tuning")
    parser.add_argument("--tasks", default=None, help="default: the base zoo model's training tasks")
    parser.add_argument("--filler", default=None,
                        help="haystack text for fine-tuning and evaluation: 'wiki', a .txt file or folder (default: "
                             "the text the base zoo model was trained on, else wiki)")
    parser.add_argument("--train-lengths", default="1024")
    parser.add_argument("--train-k", default="0.02", help="Top-k of the Top-k SFT arm (ratio or count)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--data-seed", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="training seed (both arms)")
    parser.add_argument("--lengths", default="1024", help="evaluation lengths")
    parser.add_argument("--samples", type=int, default=20, help="evaluation samples per task and length")
    parser.add_argument("--eval-k", default="0.005,0.02,0.1")
    parser.add_argument("--record", action="store_true", help="also measure recall / mass recall (slower)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="results/topk_sft")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    set_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    base = base_model(args, out)
    args.filler = default_filler(base, args.filler)
    configs = configurations(["dense", "exact"], [parse_k(k) for k in args.eval_k.split(",")], per="head",
                             record=args.record)
    args.tasks = ",".join(default_tasks(base, args.tasks))
    tasks = build_tasks(args.tasks.split(","), args.filler)
    lengths = [int(n) for n in args.lengths.split(",")]
    frames, forced = [], []
    for arm in ARMS:
        # the cached rows are keyed by the checkpoint's training.json (its base and settings), not the arm's name
        model, tokenizer = load(arm_checkpoint(arm, base, args, out), args.device)
        forced.append(evaluate_teacher_forced(model, tokenizer, arm, tasks, lengths, args.samples, configs, out, 0,
                                              args.max_new_tokens))
        frames.append(evaluate(model, tokenizer, arm, tasks, lengths, args.samples, configs, out, 0,
                               args.max_new_tokens))
    results = pd.concat(frames, ignore_index=True)
    write_table(results, out / "results.parquet")
    write_table(pd.concat(forced, ignore_index=True), out / "teacher_forced.parquet")
    title = f"Top-k SFT (k={args.train_k}) vs dense SFT of {Path(base).name}, decoded with exact Top-k"
    text = summarise(results, out, title, seed=0) + "\n" + likelihood_summary(pd.concat(forced), out, seed=0)
    write_text(text, out / "summary.md")
    print(text)
    print(f"{len(results)} rows, {time.perf_counter() - start:.0f} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
