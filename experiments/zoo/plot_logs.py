"""Answer loss against training step for zoo checkpoints (their train_log.csv): where retrieval is learned.

    python experiments/zoo/plot_logs.py results/zoo/zoo-s-noise-short results/zoo/zoo-s-noise --out experiments/zoo/answer_loss.png
"""

import argparse
from pathlib import Path

import pandas as pd
import seaborn as sns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="zoo checkpoint folders")
    parser.add_argument("--out", default="answer_loss.png")
    parser.add_argument("--smooth", type=int, default=50, help="rolling mean over this many steps")
    args = parser.parse_args()
    logs = []
    for folder in map(Path, args.checkpoints):
        log = pd.read_csv(folder / "train_log.csv")
        log["answer loss"] = log["answer_loss"].rolling(args.smooth, min_periods=1).mean()
        logs.append(log.assign(model=folder.name))
    frame = pd.concat(logs, ignore_index=True)
    sns.set_theme(style="whitegrid")
    grid = sns.relplot(frame, x="step", y="answer loss", hue="model", kind="line", height=3.5, aspect=1.6)
    grid.set(yscale="log", title=f"answer-token loss (rolling mean of {args.smooth} steps)")
    grid.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
