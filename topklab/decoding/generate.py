"""`topklab generate --indexer SPEC --k K "prompt"`: greedy generation with Top-k attention on a model."""

from __future__ import annotations

import argparse
import logging

import torch

from topklab.decoding.topk_attention import PER_CHOICES, PREFILL_CHOICES, check_k, topk_attention
from topklab.models import DEFAULT_MODEL, load_model

log = logging.getLogger(__name__)


def parse_k(text: str) -> int | float:
    """``"64"`` -> 64 keys; ``"0.02"`` -> 2% of the context."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            message = f"--k takes a key count (64) or a ratio in (0, 1] (0.02), got {text!r}"
            raise argparse.ArgumentTypeError(message) from None
    try:
        return check_k(value)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dense-layers takes comma-separated layer numbers, got {text!r}") from None


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument("--indexer", default="exact", help="indexer spec, e.g. exact, oracle:p=0.6 (default: exact)")
    parser.add_argument("--k", type=parse_k, required=True,
                        help="keys attended per decode step: a count (64) or a ratio of the context (0.02)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--per", choices=PER_CHOICES, default=None,
                        help="one Top-k per query head, per KV-head group or per layer (default: head)")
    parser.add_argument("--sinks", type=int, default=0, help="first tokens always attended (default: 0)")
    parser.add_argument("--window", type=int, default=0, help="most recent tokens always attended (default: 0)")
    parser.add_argument("--dense-layers", type=_layer_list, default=[], help="layers left dense, e.g. 0,1")
    parser.add_argument("--prefill", choices=PREFILL_CHOICES, default="dense", help="prompt attention (default: dense)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--compare-dense", action="store_true", help="also generate with dense attention")
    parser.add_argument("--record", metavar="CSV", help="write per-step recall / mass recall to this CSV file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run_generate(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model, device=args.device)
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer (tiny test models take token ids, not text)")
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = args.prompt
    encoded = tokenizer(text, return_tensors="pt").to(args.device)

    def generate() -> str:
        out = model.generate(**encoded, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0, encoded.input_ids.shape[1]:], skip_special_tokens=True)

    options = dict(k=args.k, per=args.per, sinks=args.sinks, window=args.window, dense_layers=args.dense_layers,
                   prefill=args.prefill, record=bool(args.record))
    with torch.no_grad(), topk_attention(model, args.indexer, **options) as handle:
        sparse = generate()
    print(f"[{args.indexer}, k={args.k}, per={handle.per}] {sparse}")
    if args.compare_dense:
        with torch.no_grad():
            dense = generate()
        print(f"[dense] {dense}")
        print("same text as dense" if dense == sparse else "differs from dense")
    if args.record:
        frame = handle.recorder.frame()
        frame.to_csv(args.record, index=False)
        if len(frame):
            summary = frame.groupby("layer")[["recall", "mass_recall", "output_error"]].mean()
            print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
        else:
            print(f"no decode step selected fewer keys than the context (k={args.k}); nothing to record")
        print(f"wrote {len(frame)} rows to {args.record}")
    return 0
