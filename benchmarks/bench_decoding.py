"""Decode speed of Top-k attention inside a transformers model: dense SDPA vs exact Top-k, at long contexts.

A Llama built from a config (random weights; 32 query heads over 8 KV heads, d = 128, bf16) prefills a random
prompt of N tokens once; then each mode decodes greedily from the same cache (cropped back to the prompt between
modes): ``warmup`` untimed steps (the Top-k index is built on the first), then ``steps`` timed ones. Reported:

- attention ms / step: CUDA events around every layer's attention function, summed over layers (so the Top-k
  number covers the whole path: index add, selection, gather and softmax);
- step ms and tokens/s: wall time of whole decode steps (projections, MLP, the cache's concatenation included);
- speedups against dense.

    PYTHONPATH=. python3 benchmarks/bench_decoding.py                # H100: N = 32K and 128K, k = 2048
    PYTHONPATH=. python3 benchmarks/bench_decoding.py --tiny         # CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import time

import torch

from topklab.decoding.hf import attention_hook, dense_attention
from topklab.decoding.topk_attention import topk_attention


class AttentionTimer:
    """Wraps an attention function; while ``active``, times each decode call with CUDA events (wall time on CPU)."""

    def __init__(self, attention):
        self.attention = attention
        self.active = False
        self.spans: list = []
        self.host_seconds = 0.0  # time the host spends inside the attention function (enqueueing, on CUDA)

    def __call__(self, module, query, *args, **kwargs):
        if not self.active or query.shape[2] != 1:
            return self.attention(module, query, *args, **kwargs)
        if query.is_cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            begin = time.perf_counter()
            out = self.attention(module, query, *args, **kwargs)
            self.host_seconds += time.perf_counter() - begin
            stop.record()
            self.spans.append((start, stop))
        else:
            begin = time.perf_counter()
            out = self.attention(module, query, *args, **kwargs)
            self.spans.append(time.perf_counter() - begin)
        return out

    def total_ms(self) -> float:
        if self.spans and isinstance(self.spans[0], tuple):
            torch.cuda.synchronize()
            return sum(start.elapsed_time(stop) for start, stop in self.spans)
        return 1000 * sum(self.spans)


def build_model(tiny: bool, layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        shape = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=512)
    else:
        shape = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     intermediate_size=14336)
    config = LlamaConfig(**shape, num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=1 << 20,
                         rope_theta=500000.0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


@torch.no_grad()
def decode(model, cache, token, steps: int, timer: AttentionTimer, warmup: int, device: str) -> dict:
    """Greedy decode ``warmup + steps`` tokens; time the last ``steps``."""
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            timer.active, begin = True, time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    wall = time.perf_counter() - begin
    timer.active = False
    return {"attention_ms": timer.total_ms() / steps, "attention_host_ms": 1000 * timer.host_seconds / steps,
            "step_ms": 1000 * wall / steps, "tokens_per_s": steps / wall}


def run_mode(model, cache, prompt_len, token, mode, args) -> dict:
    extra = cache.get_seq_length() - prompt_len
    if extra:
        cache.crop(-extra)  # negative: drop that many tokens (transformers 4.x and 5.x agree on this form)
    if mode == "dense":
        timer = AttentionTimer(dense_attention)
        with attention_hook(model, timer):
            return decode(model, cache, token, args.steps, timer, args.warmup, args.device)
    per = mode.removeprefix("topk-")
    with topk_attention(model, "exact", k=args.k, per=per) as handle:
        timer = AttentionTimer(handle.attention)
        with attention_hook(model, timer):
            return decode(model, cache, token, args.steps, timer, args.warmup, args.device)


@torch.no_grad()
def profile_modes(model, cache, prompt_len, token, args, path: str) -> None:
    """torch.profiler over a few decode steps of each mode (after its warm-up): CPU and CUDA time by op."""
    from torch.profiler import ProfilerActivity, profile

    steps, warmup = args.steps, args.warmup
    args.steps, args.warmup = 4, 8
    try:
        with open(path, "a") as out:
            for mode in args.modes.split(","):
                run_mode(model, cache, prompt_len, token, mode, args)  # warm (compiles, allocator)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    run_mode(model, cache, prompt_len, token, mode, args)
                averages = prof.key_averages()
                out.write(f"\n## N = {prompt_len}, {mode}: 12 decode steps (8 + 4), sorted by CPU time\n")
                out.write(averages.table(sort_by="self_cpu_time_total", row_limit=25))
                out.write(f"\n## N = {prompt_len}, {mode}: sorted by CUDA time\n")
                out.write(averages.table(sort_by="self_device_time_total", row_limit=25))
    finally:
        args.steps, args.warmup = steps, warmup


@torch.no_grad()
def attention_micro(model, cache, args, calls: int = 50) -> dict:
    """One layer's decode attention on the prefilled cache, back to back at a fixed length (ms per call)."""
    from topklab import kernels
    from topklab.decoding.hf import attention_modules

    module = attention_modules(model)[0]
    keys, values = cache.layers[0].keys, cache.layers[0].values
    heads = model.config.num_attention_heads
    query = torch.randn(1, heads, 1, keys.shape[-1], device=keys.device, dtype=keys.dtype)
    scale = keys.shape[-1] ** -0.5
    with topk_attention(model, "exact", k=args.k) as handle:
        candidates = {
            "dense_sdpa_ms": lambda: dense_attention(module, query, keys, values, None, scaling=scale, dropout=0.0),
            "fused_topk_kernel_ms": lambda: kernels.topk_attention(query[:, :, 0], keys, values, args.k, scale=scale),
            "topk_hook_ms": lambda: handle.attention(module, query, keys, values, None, scaling=scale, dropout=0.0),
        }
        timings = {}
        for name, call in candidates.items():
            for _ in range(5):
                call()
            _sync(args.device)
            begin = time.perf_counter()
            for _ in range(calls):
                call()
            _sync(args.device)
            timings[name] = 1000 * (time.perf_counter() - begin) / calls
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="32768,131072", help="prompt lengths N (comma-separated)")
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=40,
                        help="untimed steps first (>= 16 lets Triton compile every variant its int-argument "
                             "specialisation makes as N grows)")
    parser.add_argument("--allow-cudnn", action="store_true",
                        help="let dense SDPA use cuDNN (torch 2.11 re-plans it at every new length: ~50 ms a call)")
    parser.add_argument("--modes", default="dense,topk-head,topk-group", help="dense and/or topk-{head,group,layer}")
    parser.add_argument("--tiny", action="store_true", help="a small model and contexts for a CPU smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", help="append torch.profiler tables of a few decode steps per mode here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.tiny:
        args.contexts, args.k = "512", min(args.k, 32)
    contexts = [int(n) for n in args.contexts.split(",")]
    modes = args.modes.split(",")

    if args.device != "cpu" and not args.allow_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)  # dense baseline on flash / memory-efficient SDPA
    model = build_model(args.tiny, args.layers, args.device)
    from topklab import kernels

    card = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    import transformers

    meta = {"card": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "transformers": transformers.__version__, "k": args.k,
            "layers": args.layers, "steps": args.steps, "warmup": args.warmup, "cudnn_sdpa": args.allow_cudnn,
            "kernels": sorted(name for name in dir(kernels) if not name.startswith("_"))}
    print(json.dumps(meta))
    results = []
    generator = torch.Generator().manual_seed(0)
    for n in contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=generator).to(args.device)
        _sync(args.device)
        begin = time.perf_counter()
        try:
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        except Exception as err:
            logging.exception("prefill of N=%d failed", n)
            results.append({"context": n, "mode": "prefill", "error": f"{type(err).__name__}: {err}"})
            continue
        _sync(args.device)
        prefill_s = time.perf_counter() - begin
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        del out
        rows = {}
        try:
            micro = attention_micro(model, cache, args)
        except Exception as err:
            logging.exception("micro benchmark at N=%d failed", n)
            micro = {"error": f"{type(err).__name__}: {err}"}
        results.append({"context": n, "mode": "micro", **micro})
        print(json.dumps(results[-1]))
        for mode in modes:
            try:
                rows[mode] = run_mode(model, cache, n, token, mode, args)
            except Exception as err:  # keep the other modes' numbers from a one-shot device run
                logging.exception("mode %s at N=%d failed", mode, n)
                rows[mode] = {"error": f"{type(err).__name__}: {err}"}
        if args.profile:
            try:
                profile_modes(model, cache, n, token, args, args.profile)
            except Exception:
                logging.exception("profiling at N=%d failed", n)
        dense = rows.get("dense", {})
        for mode, row in rows.items():
            if "error" not in row and "attention_ms" in dense:
                row["attention_speedup"] = dense["attention_ms"] / row["attention_ms"]
                row["tokens_speedup"] = row["tokens_per_s"] / dense["tokens_per_s"]
            results.append({"context": n, "mode": mode, "prefill_s": prefill_s, **row})
            print(json.dumps(results[-1]))
        del cache
        if args.device != "cpu":
            torch.cuda.empty_cache()
    print(f"\n{'N':>7} {'mode':>11} {'attn ms/step':>13} {'x dense':>8} {'host ms':>8} {'step ms':>8} {'tok/s':>8} "
          f"{'x dense':>8}")
    for row in results:
        if row["mode"] == "micro" and "error" not in row:
            timings = ", ".join(f"{name} {value:.3f}" for name, value in row.items() if name.endswith("_ms"))
            print(f"{row['context']:>7} {'one layer':>11} {timings}")
            continue
        if "error" in row:
            print(f"{row['context']:>7} {row['mode']:>11} {row['error']}")
            continue
        print(f"{row['context']:>7} {row['mode']:>11} {row['attention_ms']:>13.3f} "
              f"{row.get('attention_speedup', 1):>8.2f} {row['attention_host_ms']:>8.3f} {row['step_ms']:>8.2f} "
              f"{row['tokens_per_s']:>8.1f} "
              f"{row.get('tokens_speedup', 1):>8.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
