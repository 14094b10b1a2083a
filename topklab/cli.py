"""The `topklab` command line: `recall` (the main job), `generate`, `eval`, `report`, and `indexers`."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _add_recall(sub) -> None:
    from topklab.fidelity.recall_job import RecallConfig
    from topklab.runtime import device_argument

    d = RecallConfig()
    p = sub.add_parser("recall", help="measure indexer recall against the exact Top-k on real attention",
                       description="Capture attention from a model on real text, replay the decode positions through "
                                   "each indexer, and write results.parquet, summary.csv and recall.png.")
    p.add_argument("--model", default=d.model, help="'smollm2' (embedded default), 'tiny-llama', or a HF folder")
    p.add_argument("--text", default=d.text, help="'wiki', 'news', a .txt file or a folder of .txt files")
    p.add_argument("--lengths", type=_ints, default=d.lengths, help="token length of each evaluated document")
    p.add_argument("--decode", type=int, default=d.decode, help="decode positions per document (its last tokens)")
    p.add_argument("--fit-texts", type=int, default=d.fit_texts, help="held-out documents to fit learned indexers")
    p.add_argument("--fit-length", type=int, default=d.fit_length)
    p.add_argument("--indexers", nargs="+", default=list(d.indexers), metavar="SPEC",
                   help="indexer specs, e.g. exact 'oracle:p=0.5' (default: every registered family's examples)")
    p.add_argument("--k", type=_ints, default=d.ks, dest="ks", help="comma-separated k values")
    p.add_argument("--layers", default=d.layers, help="'all', 'spread:N' or comma-separated layer indices")
    p.add_argument("--out", default=d.out, help="output folder (re-running reuses finished work)")
    p.add_argument("--device", type=device_argument, default=d.device)
    p.set_defaults(run=_run_recall)


def _run_recall(args) -> int:
    from topklab.fidelity.recall_job import RecallConfig, format_summary, run_recall

    config = RecallConfig(model=args.model, text=args.text, lengths=args.lengths, decode=args.decode,
                          fit_texts=args.fit_texts, fit_length=args.fit_length, indexers=tuple(args.indexers),
                          ks=args.ks, layers=args.layers, out=args.out, device=args.device)
    start = time.perf_counter()
    outputs = run_recall(config)
    print(format_summary(outputs.summary))
    for name, path in outputs.files.items():
        print(f"{name:>8}: {path}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def _add_indexers(sub) -> None:
    p = sub.add_parser("indexers", help="list registered indexers with their parameters and defaults")
    p.set_defaults(run=_run_indexers)


def _run_indexers(args) -> int:
    from topklab.indexers import available, parameters

    for name in available():
        params = parameters(name)
        print(f"{name}: " + (", ".join(f"{k}={v}" for k, v in params.items()) or "(no parameters)"))
    return 0


def _add_generate(sub) -> None:
    from topklab.decoding.generate import add_generate_arguments, run_generate

    p = sub.add_parser("generate", help="generate text with Top-k attention chosen by any indexer")
    add_generate_arguments(p)
    p.set_defaults(run=run_generate)


def _add_eval(sub) -> None:
    from topklab.tasks.cli import add_eval_arguments, run_eval

    p = sub.add_parser("eval", help="downstream task accuracy under Top-k decoding (resumable, torchrun-shardable)")
    add_eval_arguments(p)
    p.set_defaults(run=run_eval)


def _add_report(sub) -> None:
    from topklab.analysis.report import add_report_arguments, run_report

    p = sub.add_parser("report", help="write a markdown report (tables and figures) of a results folder")
    add_report_arguments(p)
    p.set_defaults(run=run_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="topklab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_recall, _add_generate, _add_eval, _add_report, _add_indexers):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv or ["recall"])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("gensim", "matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.run(args)
    except (ValueError, OSError, ImportError, KeyError) as err:  # bad input or files: one line (-v: the traceback)
        if args.verbose:
            raise
        parser.exit(2, f"topklab {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
