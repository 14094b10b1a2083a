"""Claim 1: exact Top-k decoding vs full attention across k on the task suite.

    python experiments/topk_decoding/run.py                        # SmolLM2 on CPU (20 min on a shared 2-core machine)
    python experiments/topk_decoding/run.py --model results/zoo/zoo-s --samples 50 --lengths 1024,2048

Every sample's prompt is prefilled once with dense attention (the study keeps prefill dense); the answer is then
decoded greedily with dense attention and with exact Top-k attention (per query head, softmax renormalised over the
k keys) at each k. Writes OUT/results.parquet (one row per sample x configuration), OUT/summary.csv,
OUT/summary.md and OUT/accuracy_vs_k.png; re-running reuses finished samples.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import (  # noqa: E402
    accuracy_by_task,
    build_tasks,
    evaluate,
    paired_difference,
    parse_k,
    per_scope,
    set_threads,
    setting,
    write_summary,
)

from topklab.io import write_table  # noqa: E402
from topklab.training.topk_sft import default_filler  # noqa: E402
from topklab.tasks.evaluate import configurations  # noqa: E402


def load(name: str, device: str):
    from topklab.training.zoo import is_zoo_checkpoint, load_zoo_model

    if is_zoo_checkpoint(name):
        return load_zoo_model(name, device=device)
    from topklab.models import load_model

    return load_model(name, device=device)


def summarise(results: pd.DataFrame, out: Path, title: str, seed: int) -> str:
    results = results.assign(setting=setting(results))
    table = accuracy_by_task(results, ["model", "task", "indexer", "k", "setting"], seed)
    diffs = pd.concat([per_scope(results, lambda frame: paired_difference(frame, "setting", name, "dense", seed=seed))
                       .assign(setting=name) for name in sorted(set(results["setting"]) - {"dense"})],
                      ignore_index=True)
    return write_summary(out, title, table, diffs, name="model", diff_label="Top-k minus dense [95% CI]",
                         diffs_file="paired_vs_dense.csv",
                         headings=("Accuracy per configuration", "Paired difference to dense decoding (same samples)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, a zoo checkpoint folder or a HF folder")
    parser.add_argument("--tasks", default="passkey,niah_single,vt")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--samples", type=int, default=4, help="per task and length")
    parser.add_argument("--k", default="0.005,0.02,0.1", help="comma-separated k: ratios of the context or key counts")
    parser.add_argument("--per", default="head", choices=("head", "group", "layer"))
    parser.add_argument("--record", action="store_true", help="also measure recall / mass recall (2-3x slower)")
    parser.add_argument("--filler", default=None,
                        help="haystack text: 'wiki', a .txt file or folder (default: a zoo model's training text, "
                             "else wiki)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: each task's own budget")
    parser.add_argument("--seed", type=int, default=0, help="sample seed (0: the samples `topklab eval` draws)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="results/topk_decoding")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    set_threads(args.threads)
    ks = [parse_k(k) for k in args.k.split(",")]
    configs = configurations(["dense", "exact"], ks, per=args.per, record=args.record)
    tasks = build_tasks(args.tasks.split(","), default_filler(args.model, args.filler))
    lengths = [int(n) for n in args.lengths.split(",")]
    start = time.perf_counter()
    model, tokenizer = load(args.model, args.device)
    name = Path(args.model).name
    results = evaluate(model, tokenizer, name, tasks, lengths, args.samples, configs, args.out, args.seed,
                       args.max_new_tokens)
    out = Path(args.out)
    write_table(results, out / "results.parquet")
    print(summarise(results, out, f"Exact Top-k decoding vs dense: {name}, lengths {args.lengths}", args.seed))
    print(f"{len(results)} rows, {time.perf_counter() - start:.0f} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
