"""Claim 3 (REFERENCE.md §1): downstream accuracy rises with the indexer's fidelity.

The controlled-fidelity oracle (recall@k exactly p, the other slots random keys) at p = 0, 0.1, ..., 1 and real
indexers, each at every k, decode the task suite on SmolLM2 (`topklab eval`, prefill dense); then
`topklab report` correlates fidelity with accuracy over configurations (bootstrap over samples) and places the real
indexers against the oracle curve. Re-running reuses finished cells in results/.

    .venv/bin/python experiments/fidelity_sweep/run.py [config.json]

Writes results/ (tidy rows, ignored by git) and report.md + figures/ here.
"""

import json
import logging
import sys
from pathlib import Path

from topklab.analysis.report import write_report
from topklab.tasks.evaluate import EvalConfig, run_evaluation

HERE = Path(__file__).resolve().parent


def main(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    run_evaluation(EvalConfig(**{**config["eval"], "out": str(HERE / "results")}))
    report = write_report(HERE / "results", HERE / "report.md", n_resamples=config["report"]["resamples"],
                          seed=config["report"]["seed"])
    print(f"report: {report}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "config.json")
