"""Claim 4 (REFERENCE.md §1): after Top-k fine-tuning, attention entropy on downstream tasks drops.

Three models read the same task prompts (the samples `topklab eval` scores, seed 0; training draws from another
seed): the base model, a dense-SFT control and a Top-k-SFT model, both fine-tuned from the base with the same data,
steps and seed (`topklab.training.topk_sft`), differing only in the attention of the training forward pass. For
each, attention entropy at the decode positions of every layer and head, and the mass exact Top-k keeps
(`topklab.analysis.entropy.task_entropy`), go to results/entropy/entropy.parquet; the report compares each model
with the dense-SFT control (paired bootstrap over prompts) and relates a head's entropy to the mass Top-k loses.
Re-running reuses the fine-tuned checkpoints (while their recorded settings match the config) and the entropy rows
in results/ (named by a digest of the settings and weights they come from).

    .venv/bin/python experiments/entropy/run.py [config.json]
    .venv/bin/python experiments/entropy/run.py experiments/entropy/config_zoo.json   # arms trained on the GPU

Writes the config's ``out`` folder (checkpoints and rows, ignored by git; default results/) and its ``report``
(default report.md, figures/ beside it). ``arms`` (optional) names already fine-tuned checkpoints instead of
fine-tuning here, e.g. the dense and Top-k fine-tunes of a zoo model that experiments/zoo/run.sh made.
"""

import json
import logging
import sys
from pathlib import Path

import pandas as pd
import torch

from topklab.analysis.entropy import ENTROPY_FILE, task_entropy
from topklab.analysis.report import write_report
from topklab.io import digest, read_table, write_table
from topklab.training.reuse import checkpoint_identity, reusable_checkpoint
from topklab.training.topk_sft import TaskData, TopkSpec, TrainConfig, default_filler, finetune, load_trainable

HERE = Path(__file__).resolve().parent
log = logging.getLogger("experiments.entropy")


def checkpoint_for(config: dict, arm: str | None) -> str:
    """The checkpoint of one arm: the base (None), or its "dense" / "topk" fine-tune: the checkpoint the config's
    ``arms`` names, else one fine-tuned here (reused while its recorded settings match the config's ``finetune``)."""
    base = config["model"]
    if arm is None:
        return base
    if arm in config.get("arms", {}):
        return config["arms"][arm]
    checkpoint = results_dir(config) / f"{Path(base).name}-{arm}-sft"
    ft = config["finetune"]
    data = TaskData(tasks=tuple(ft["tasks"]), lengths=tuple(ft["lengths"]), filler=default_filler(base, None))
    train = TrainConfig(steps=ft["steps"], batch_size=ft["batch_size"], lr=ft["lr"], warmup=ft["warmup"],
                        seed=ft["seed"], topk=TopkSpec(ft["topk_k"]) if arm == "topk" else None)
    if not reusable_checkpoint(checkpoint, base, data, train):
        torch.manual_seed(ft["seed"])
        model, tokenizer = load_trainable(base, device_of(config))
        frame = finetune(model, tokenizer, data, train, checkpoint)
        log.info("%s-SFT: loss %.3f -> %.3f in %d steps", arm, frame["loss"].head(5).mean(),
                 frame["loss"].tail(5).mean(), len(frame))
    return str(checkpoint)


def device_of(config: dict) -> str:
    return config["device"] or ("cuda" if torch.cuda.is_available() else "cpu")


def results_dir(config: dict) -> Path:
    return HERE / config.get("out", "results")


def entropy_rows(config: dict, arm: str | None) -> pd.DataFrame:
    """Entropy rows of one arm on the evaluation prompts, computed once per digest of what they depend on (the
    entropy settings, the weights and the haystack text), then read back."""
    name, checkpoint = arm_name(config, arm), checkpoint_for(config, arm)
    filler = default_filler(config["model"], None)
    e = config["entropy"]
    key = digest([e, checkpoint_identity(checkpoint), name, filler])[:12]
    path = results_dir(config) / "rows" / f"{name}-{key}.parquet"
    if path.is_file():
        return read_table(path)
    model, tokenizer = load_trainable(checkpoint, device_of(config))
    model.eval()
    rows = task_entropy(model, tokenizer, tasks=e["tasks"], lengths=e["lengths"], samples=e["samples"],
                        decode_steps=e["decode_steps"], layers=e["layers"], ks=e["ks"], model_name=name,
                        filler=filler)
    write_table(rows, path)
    return rows


def arm_name(config: dict, arm: str | None) -> str:
    """The model's name in the rows: the base's folder name, with -dense-sft / -topk-sft for the fine-tunes."""
    return Path(config["model"]).name + (f"-{arm}-sft" if arm else "")


def main(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    rows = pd.concat([entropy_rows(config, arm) for arm in (None, "dense", "topk")], ignore_index=True)
    write_table(rows, results_dir(config) / "entropy" / ENTROPY_FILE)
    report = write_report(results_dir(config) / "entropy", HERE / config["report"].get("path", "report.md"),
                          n_resamples=config["report"]["resamples"], seed=config["report"]["seed"],
                          baseline=arm_name(config, "dense"))
    print(f"report: {report}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "config.json")
