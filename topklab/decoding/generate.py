"""`topklab generate --indexer SPEC --k K "prompt"`: greedy generation with Top-k attention on a model, and greedy
decoding over a static KV cache whose step can be replayed as a CUDA graph (no host work per token)."""

from __future__ import annotations

import argparse
import logging

import torch

from topklab.decoding.hf import cache_keyword, static_cache
from topklab.decoding.topk_attention import PER_CHOICES, PREFILL_CHOICES, check_k, topk_attention
from topklab.kernels.topk import clear_scratch
from topklab.models import DEFAULT_MODEL, load_model
from topklab.runtime import device_argument

log = logging.getLogger(__name__)


class GreedyStep:
    """One greedy decode step over a static cache: each call feeds ``token [B, 1]``, appends it to ``cache`` and
    writes the next token into the same buffer (returned; clone it to keep it).

    With ``cuda_graph`` the first ``warmup`` calls run eagerly (kernels compile, buffers settle), the next one
    captures the step in a CUDA graph and runs it, and every later call replays the graph: one launch per token, no
    host work inside. The model's attention must not read device values on the host during a step: dense SDPA and
    `topk_attention` with the plain exact indexer qualify. The cache must be a transformers ``StaticCache`` without
    sliding-window layers (theirs keep their position in a Python int).

    A left-padded batch passes ``attention_mask [B, max_cache_len]`` (0 at each sequence's padding, 1 elsewhere,
    future positions included: causality hides them, so the mask never changes) and ``positions [B, 1]``, the
    position id of each sequence's next token (its count of real tokens so far), advanced in place every step.
    """

    def __init__(self, model: torch.nn.Module, cache, token: torch.Tensor, *,
                 attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                 cuda_graph: bool = False, warmup: int = 2):
        if cuda_graph and token.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on a CUDA device, got tokens on {token.device}")
        if cuda_graph and any(layer.is_sliding for layer in cache.layers):
            raise ValueError("CUDA-graph decoding needs a cache without sliding-window layers (their position is a "
                             "Python int that a graph would freeze)")
        if token.dim() != 2 or token.shape[1] != 1:
            raise ValueError(f"token must be [batch, 1] (the last token of each sequence), got {tuple(token.shape)}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager step (kernels compile before a capture), got {warmup}")
        if (attention_mask is None) != (positions is None):
            raise ValueError("a padded batch needs both attention_mask [B, max_cache_len] and positions [B, 1]")
        self.capacity = max(layer.max_cache_len for layer in cache.layers)
        if attention_mask is not None:
            # a narrower mask would be zero-padded by transformers: every new token masked out as padding
            if attention_mask.shape != (token.shape[0], self.capacity) or positions.shape != token.shape:
                raise ValueError(f"attention_mask must be [B, max_cache_len] = [{token.shape[0]}, {self.capacity}] "
                                 f"(1 past the prompt) and positions [B, 1]; got {tuple(attention_mask.shape)} and "
                                 f"{tuple(positions.shape)}")
            if attention_mask.device != token.device or positions.device != token.device:
                raise ValueError(f"attention_mask and positions must be on the tokens' device ({token.device})")
        self.model, self.cache = model, cache
        self.token = token.clone()
        self.padding = None if attention_mask is None else dict(attention_mask=attention_mask,
                                                                 position_ids=positions.clone())
        self.cuda_graph, self.warmup = cuda_graph, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self._keyword = cache_keyword(model)
        self._calls = 0
        self._room = self.capacity - int(cache.get_seq_length())  # positions left in the cache (one host read)

    @torch.no_grad()
    def _step(self) -> None:
        out = self.model(input_ids=self.token, use_cache=True, logits_to_keep=1, **{self._keyword: self.cache},
                         **(self.padding or {}))
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        if self.padding is not None:
            self.padding["position_ids"].add_(1)

    def __call__(self) -> torch.Tensor:
        if self._calls >= self._room:  # a graph replay past the end would write out of bounds on the device
            raise ValueError(f"the static cache of {self.capacity} positions is full after {self._calls} steps")
        self._calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif not self.cuda_graph or self._calls <= self.warmup:
            self._step()
        else:
            self._capture()
            self.graph.replay()
        return self.token

    def _capture(self) -> None:
        # the kernels' scratch buffers are kept per stream; freeing them first makes the capture allocate its own
        # inside the graph's private memory pool, which lives as long as the graph (cached ones could be freed or
        # reused under it). Capturing does not run the step, so the cache does not advance.
        clear_scratch()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=torch.cuda.Stream()):
            self._step()
        # the graph's private pool keeps its buffers; unregistered, no later call on a recycled stream handle uses them
        clear_scratch()


@torch.no_grad()
def prefill_static(model: torch.nn.Module, input_ids: torch.Tensor, max_cache_len: int, *,
                   attention_mask: torch.Tensor | None = None, cuda_graph: bool = False) -> GreedyStep:
    """Run the prompt ``input_ids [B, T]`` (left-padded where ``attention_mask`` is 0) into a new static cache of
    ``max_cache_len`` positions and return the `GreedyStep` that continues it (its ``token`` holds the first new
    token). Position ids and the step's fixed mask are those transformers' generate gives a left-padded batch."""
    if max_cache_len <= input_ids.shape[1]:
        raise ValueError(f"max_cache_len = {max_cache_len} leaves no room after the {input_ids.shape[1]}-token prompt")
    cache = static_cache(model, max_cache_len)
    padding, step_padding = {}, {}
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        mask = attention_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padding = dict(attention_mask=mask, position_ids=positions)
        full = torch.ones(mask.shape[0], max_cache_len, dtype=mask.dtype, device=mask.device)
        full[:, :mask.shape[1]] = mask
        step_padding = dict(attention_mask=full, positions=positions[:, -1:] + 1)
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache}, **padding)
    return GreedyStep(model, cache, out.logits[:, -1:].argmax(-1), cuda_graph=cuda_graph, **step_padding)


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                    attention_mask: torch.Tensor | None = None, cuda_graph: bool = False,
                    max_cache_len: int | None = None) -> torch.Tensor:
    """Greedy continuation ``[B, max_new_tokens]`` of ``input_ids [B, T]`` (left-padded where ``attention_mask``
    says so) over a static cache (`prefill_static`, then `GreedyStep`); with ``cuda_graph`` the steps are replayed
    from a CUDA graph. The tokens equal ``model.generate(..., do_sample=False)`` without early stopping at an
    end-of-sequence token and without the generation config's logits processors."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    length = input_ids.shape[1] + max_new_tokens
    if max_cache_len is not None and max_cache_len < length:
        raise ValueError(f"max_cache_len = {max_cache_len} cannot hold the prompt and {max_new_tokens} new tokens "
                         f"({length} positions)")
    step = prefill_static(model, input_ids, max_cache_len or length, attention_mask=attention_mask,
                          cuda_graph=cuda_graph)
    tokens = [step.token.clone()]
    tokens += [step().clone() for _ in range(max_new_tokens - 1)]
    return torch.cat(tokens, dim=1)


def _until_eos(tokens: torch.Tensor, eos: int | list[int] | None) -> torch.Tensor:
    """``tokens`` cut after the first end-of-sequence token, where ``model.generate`` stops."""
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    hits = torch.isin(tokens, torch.tensor(ids, device=tokens.device)).nonzero()
    return tokens if len(hits) == 0 else tokens[: int(hits[0, 0]) + 1]


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
    parser.add_argument("--cuda-graph", action="store_true",
                        help="decode over a static cache with each step replayed from a CUDA graph (CUDA only; "
                             "Top-k needs the exact indexer with an int k and no sinks, window or recording)")
    parser.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu")


def run_generate(args: argparse.Namespace) -> int:
    if args.cuda_graph and not str(args.device).startswith("cuda"):
        raise ValueError(f"--cuda-graph needs a CUDA --device, got {args.device!r}")
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
        if args.cuda_graph:
            new = _until_eos(greedy_generate(model, encoded.input_ids, args.max_new_tokens, cuda_graph=True)[0],
                             model.generation_config.eos_token_id or tokenizer.eos_token_id)
        else:
            out = model.generate(**encoded, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            new = out[0, encoded.input_ids.shape[1]:]
        return tokenizer.decode(new, skip_special_tokens=True)

    options = dict(k=args.k, per=args.per, sinks=args.sinks, window=args.window, dense_layers=args.dense_layers,
                   prefill=args.prefill, record=bool(args.record))
    with torch.no_grad(), topk_attention(model, args.indexer, **options) as handle:
        if args.cuda_graph and not handle.sync_free_decode:
            raise ValueError("--cuda-graph needs decode steps with no host sync: the exact indexer, an int --k, "
                             "per head or group, no --sinks, --window or --record")
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
