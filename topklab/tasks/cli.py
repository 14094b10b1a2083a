"""`topklab eval`: score decoding configurations (dense, indexers x k) on long-context tasks.

    topklab eval --model smollm2 --tasks passkey,niah_single --lengths 1024,2048 --samples 10 \\
        --indexers dense exact 'oracle:p=0.5' --k 16,64 --out results/eval
    torchrun --nproc-per-node 4 -m topklab.cli eval ...      # the same run, samples sharded over 4 GPUs

`add_eval_arguments(parser)` adds the options to a parser; `run_eval(args)` runs them and returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from topklab.decoding.topk_attention import PER_CHOICES, check_k
from topklab.models import DEFAULT_MODEL
from topklab.runtime import device_argument
from topklab.tasks.evaluate import DTYPES, GENERATED_TASKS, EvalConfig, Shard, run_evaluation, summarize


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected at least one task name")
    return names


def _lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths takes comma-separated token counts, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"--lengths takes positive token counts, got {text!r}")
    return values


def _ks(text: str) -> tuple[int | float, ...]:
    """``"16,64"`` -> key counts; ``"0.01,0.05"`` -> ratios of the context."""
    values = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            value = int(part)
        except ValueError:
            try:
                value = float(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"--k takes counts (64) or ratios in (0, 1] (0.02), got {part!r}") from None
        try:
            values.append(check_k(value))
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    if not values:
        raise argparse.ArgumentTypeError("--k needs at least one value")
    return tuple(values)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    parser.add_argument("--model", default=d.model,
                        help=f"'{DEFAULT_MODEL}' (embedded default), 'tiny-llama' (random, byte tokens) or a HF folder")
    parser.add_argument("--tasks", type=_names, default=d.tasks,
                        help="comma-separated tasks: " + ",".join(GENERATED_TASKS) +
                             ", longbench_v2:PATH, helmet:PATH (default: all generated ones)")
    parser.add_argument("--lengths", type=_lengths, default=d.lengths,
                        help="target lengths in the model's tokens: prompt + answer budget (default: 1024,2048,4096)")
    parser.add_argument("--samples", type=int, default=d.samples, help="samples per task and length")
    parser.add_argument("--indexers", nargs="+", default=list(d.indexers), metavar="SPEC",
                        help="'dense' and/or indexer specs, e.g. dense exact 'oracle:p=0.5' (default: dense exact)")
    parser.add_argument("--k", type=_ks, default=d.ks, dest="ks",
                        help="comma-separated k: key counts (16,64) or context ratios (0.01,0.05)")
    parser.add_argument("--per", choices=PER_CHOICES, default=None,
                        help="one Top-k per query head, KV-head group or layer (default: head)")
    parser.add_argument("--sinks", type=int, default=d.sinks, help="first tokens always attended (default: 0)")
    parser.add_argument("--window", type=int, default=d.window, help="last tokens always attended (default: 0)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer budget (default: each task's own)")
    parser.add_argument("--seed", type=int, default=d.seed, help="sample seed (default: 0)")
    parser.add_argument("--out", default=d.out, help="output folder; re-running skips finished work")
    parser.add_argument("--device", type=device_argument, default=None,
                        help="default: cuda:LOCAL_RANK with CUDA, else cpu")
    parser.add_argument("--device-map", default=None, help="'auto': spread one large HF model over all visible GPUs")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--no-chat", dest="chat", action="store_false", default=None,
                        help="do not apply the tokenizer's chat template")
    parser.add_argument("--no-record", dest="record", action="store_false",
                        help="skip the fidelity columns (recall, mass_recall, output_error)")
    parser.add_argument("--fidelity-detail", action="store_true",
                        help="also write per step/layer/head fidelity rows to OUT/fidelity/")
    parser.add_argument("--filler", default=None,
                        help="haystack text: 'wiki', a .txt file or folder (default: a zoo model's training text, "
                             "else wiki)")


def run_eval(args: argparse.Namespace) -> int:
    config = EvalConfig(
        model=args.model, tasks=tuple(args.tasks), lengths=tuple(args.lengths), samples=args.samples,
        indexers=tuple(args.indexers), ks=tuple(args.ks), per=args.per, sinks=args.sinks, window=args.window,
        max_new_tokens=args.max_new_tokens, seed=args.seed, out=args.out, device=args.device,
        device_map=args.device_map, dtype=args.dtype, chat=args.chat, record=args.record,
        fidelity_detail=args.fidelity_detail, filler=args.filler,
    )
    start = time.perf_counter()
    results = run_evaluation(config)
    if Shard.from_env().rank == 0:
        if len(results):
            print(summarize(results).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"{len(results)} rows in {config.out}/results.parquet; done in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="topklab eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return run_eval(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.exit(2, f"topklab eval: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
