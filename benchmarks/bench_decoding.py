"""Decode speed of Top-k attention inside a transformers model: dense SDPA vs exact Top-k, at long contexts.

A Llama built from a config (random weights; 32 query heads over 8 KV heads, d = 128, bf16) prefills a random
prompt of N tokens once per cache kind; then each mode decodes greedily from the same cache (cropped back to the
prompt between modes): ``warmup`` untimed steps (the Top-k index is built on the first), then ``steps`` timed ones.

Eager modes (``dense``, ``topk-head``, ``topk-group``): transformers' DynamicCache, every step run from Python.

- attention ms / step: CUDA events around every layer's attention function, summed over layers (the whole path:
  selection, gather and softmax, plus whatever host time the GPU waits for);
- step ms and tokens/s: wall time of whole decode steps (projections, MLP, the cache's concatenation included).

CUDA-graph modes (``graph-dense``, ``graph-dense-flash``, ``graph-topk-head``, ``graph-topk-group``): a StaticCache
(N + warm-up + timed steps, rounded up to 256 positions); three eager steps, then the whole decode step is captured
in a CUDA graph (`topklab.decoding.generate.GreedyStep`) and replayed, one launch per token.

- step ms and tokens/s: wall time of ``steps`` back-to-back replays (synchronised at the end);
- attention ms / step: after the timed steps one more eager step records every layer's attention inputs (query,
  the static cache, the mask); a second CUDA graph runs the attention function of all layers on them (the length
  fixed at the final one) and its median replay is the attention time of one step, kernels only, no host;
- ``graph-dense`` is transformers' SDPA as it runs over a static cache: with a mask present it repeats K and V for
  GQA and takes a masked kernel; ``graph-dense-flash`` is dense attention through flash attention's varlen kernel
  with the valid length read from the mask on the device (``seqused_k``; batch 1), checked against SDPA over the
  valid prefix. The graph-dense-flash row also carries ``prefix_sdpa_ms``: SDPA (flash, enable_gqa, no mask) over
  exactly the valid keys at the same length, in a CUDA graph, which is what the eager dense mode runs per layer.
  Top-k graph rows are compared with the fastest of the three dense numbers.

    PYTHONPATH=. python3 benchmarks/bench_decoding.py                # H100: N = 32K and 128K, k = 2048
    PYTHONPATH=. python3 benchmarks/bench_decoding.py --tiny         # CPU smoke run (graph modes run eagerly)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import statistics
import time

import torch
from bench_kernels import replay_seconds

from topklab.decoding.generate import GreedyStep
from topklab.decoding.hf import attention_hook, cache_keyword, dense_attention, static_cache
from topklab.decoding.topk_attention import topk_attention
from topklab.kernels.topk import clear_scratch

EAGER_MODES = ("dense", "topk-head", "topk-group")
GRAPH_MODES = ("graph-dense", "graph-dense-flash", "graph-topk-head", "graph-topk-group")


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


def crop(cache, prompt_len: int) -> None:
    """Back to the prompt (a static cache reports its length as a device tensor)."""
    extra = int(cache.get_seq_length()) - prompt_len
    if not extra:
        return
    if all(hasattr(layer, "crop") for layer in cache.layers):
        cache.crop(-extra)  # negative: drop that many tokens (transformers 4.x and 5.x agree on this form)
    else:  # transformers 5.17's StaticLayer has no crop; its length is a device counter
        for layer in cache.layers:
            layer.cumulative_length.sub_(extra)


def run_mode(model, cache, prompt_len, token, mode, args) -> dict:
    crop(cache, prompt_len)
    if mode == "dense":
        timer = AttentionTimer(dense_attention)
        with attention_hook(model, timer):
            return decode(model, cache, token, args.steps, timer, args.warmup, args.device)
    per = mode.removeprefix("topk-")
    with topk_attention(model, "exact", k=args.k, per=per) as handle:
        timer = AttentionTimer(handle.attention)
        with attention_hook(model, timer):
            return decode(model, cache, token, args.steps, timer, args.warmup, args.device)


_FLASH_LENGTHS: list = [None, None]  # (the mask of the current forward pass, what flash needs from it)


def flash_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense decode over a static cache through flash attention's varlen kernel (split-KV for decoding), the valid
    length counted from the mask on the device (``seqused_k``): no host sync and no repeated K/V. Batch-1 decode
    steps on CUDA only; anything else goes to transformers' SDPA."""
    if query.shape[2] != 1 or query.shape[0] != 1 or attention_mask is None or not query.is_cuda:
        return dense_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    heads, dim, n = query.shape[1], query.shape[3], key.shape[2]
    if attention_mask is not _FLASH_LENGTHS[0]:  # once per forward pass, as the Top-k path counts its lengths
        _FLASH_LENGTHS[:] = attention_mask, (
            attention_mask[:, 0, -1, :n].sum(-1, dtype=torch.int32),
            torch.arange(2, dtype=torch.int32, device=query.device),  # cu_seqlens: one query, one run of n keys
            torch.arange(0, 2 * n, n, dtype=torch.int32, device=query.device))
    used, bounds_q, bounds_k = _FLASH_LENGTHS[1]
    out = torch.ops.aten._flash_attention_forward(
        query.reshape(1, heads, dim), key[0].transpose(0, 1), value[0].transpose(0, 1), bounds_q, bounds_k, 1, n,
        0.0, False, False, scale=scaling, seqused_k=used)[0]
    return out.view(1, 1, heads, dim), None


class InputRecorder:
    """Wraps an attention function; while ``armed``, keeps each layer's decode-step inputs (one mask copy per
    forward pass, as the model shares it between layers) so that the attention alone can be replayed."""

    def __init__(self, attention):
        self.attention = attention
        self.armed = False
        self.calls: list = []
        self._masks: dict = {}

    def __call__(self, module, query, key, value, mask, **kwargs):
        if self.armed and query.shape[2] == 1:
            if mask is not None and id(mask) not in self._masks:
                self._masks[id(mask)] = (mask, mask.clone())  # the original keeps the id from being reused
            kept = None if mask is None else self._masks[id(mask)][1]
            self.calls.append((module, query.clone(), key, value, kept, kwargs))
        return self.attention(module, query, key, value, mask, **kwargs)

    def replay(self) -> None:
        """The recorded calls again, all layers sharing one new view of each mask (a new object, as in a forward
        pass, so that nothing computed from the mask on an earlier call is reused)."""
        views: dict = {}
        for module, query, key, value, mask, kwargs in self.calls:
            if mask is not None and id(mask) not in views:
                views[id(mask)] = mask.view(mask.shape)
            self.attention(module, query, key, value, None if mask is None else views[id(mask)], **kwargs)


def graph_ms(fn, device: str, reps: int = 20) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (its scratch allocated inside the graph's own pool); on the
    CPU the median of eager calls."""
    for _ in range(2):  # compile, allocate
        fn()
    if device == "cpu":
        times = []
        for _ in range(reps):
            begin = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - begin))
        return statistics.median(times)
    torch.cuda.synchronize()
    clear_scratch()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
        fn()
    return 1000 * replay_seconds(graph, reps)


@contextlib.contextmanager
def graph_attention(model, kind: str, args):
    """The attention function a graph mode runs (dense, dense-flash, topk-head, topk-group), installed."""
    if kind.startswith("topk-"):
        with topk_attention(model, "exact", k=args.k, per=kind.removeprefix("topk-")) as handle:
            yield handle.attention
        return
    yield {"dense": dense_attention, "dense-flash": flash_decode_attention}[kind]


@torch.no_grad()
def run_graph_mode(model, cache, prompt_len, token, mode, args) -> dict:
    """Decode steps replayed from a CUDA graph over the static cache; attention timed alone in a second graph."""
    crop(cache, prompt_len)
    kind = mode.removeprefix("graph-")
    with graph_attention(model, kind, args) as attention:
        recorder = InputRecorder(attention)
        with attention_hook(model, recorder):
            step = GreedyStep(model, cache, token, cuda_graph=args.device != "cpu", warmup=3)
            for _ in range(args.warmup):
                step()
            _sync(args.device)
            begin = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(args.device)
            wall = time.perf_counter() - begin
            if args.profile and args.device != "cpu":
                profile_replays(step, f"N = {prompt_len}, {mode}", args.profile)
            recorder.armed = True
            GreedyStep(model, cache, step.token)()  # one eager step at the final length: record the inputs
            recorder.armed = False
            del step  # frees the step's graph
            row = {"attention_ms": graph_ms(recorder.replay, args.device), "step_ms": 1000 * wall / args.steps,
                   "tokens_per_s": args.steps / wall, "cuda_graph": args.device != "cpu",
                   "attention_length": int(cache.get_seq_length())}
            if kind.startswith("dense"):
                row.update(check_against_prefix(recorder, args.device))
    return row


def check_against_prefix(recorder: InputRecorder, device: str) -> dict:
    """SDPA over exactly the valid keys (flash, enable_gqa, no mask) on the recorded inputs: its time in a CUDA
    graph, and the relative difference of the recorded attention from it with the cache's unused positions
    poisoned first (large random keys and values: attending any of them shows)."""
    _, _, key, _, mask, _ = recorder.calls[0]
    length = int(mask[0, 0, -1, : key.shape[2]].sum())
    generator = torch.Generator(device=key.device).manual_seed(0)
    for _, _, key, value, _, _ in recorder.calls:
        for buffer in (key, value):
            tail = buffer[:, :, length:]
            tail.copy_(50 * torch.randn(tail.shape, generator=generator, device=tail.device, dtype=tail.dtype))

    def prefix(call):
        _, query, key, value, _, kwargs = call
        return torch.nn.functional.scaled_dot_product_attention(
            query, key[:, :, :length], value[:, :, :length], scale=kwargs.get("scaling"), enable_gqa=True)

    errors = []
    for call in recorder.calls:
        module, query, key, value, mask, kwargs = call
        out = recorder.attention(module, query, key, value, mask, **kwargs)[0].transpose(1, 2).float()
        reference = prefix(call).float()
        errors.append(float((out - reference).norm() / reference.norm()))
    return {"prefix_sdpa_ms": graph_ms(lambda: [prefix(call) for call in recorder.calls], device),
            "rel_error_vs_prefix_sdpa": max(errors)}


def profile_replays(step: GreedyStep, title: str, path: str, replays: int = 4) -> None:
    """torch.profiler over a few replays of a captured decode step: GPU time by kernel inside the graph."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            step()
        torch.cuda.synchronize()
    with open(path, "a") as out:
        out.write(f"\n## {title}: {replays} CUDA-graph replays of the decode step, sorted by CUDA time\n")
        out.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25))


@torch.no_grad()
def profile_modes(model, cache, prompt_len, token, args, path: str) -> None:
    """torch.profiler over a few decode steps of each eager mode (after its warm-up): CPU and CUDA time by op."""
    from torch.profiler import ProfilerActivity, profile

    steps, warmup = args.steps, args.warmup
    args.steps, args.warmup = 4, 8
    try:
        with open(path, "a") as out:
            for mode in [m for m in args.modes.split(",") if m in EAGER_MODES]:
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


@torch.no_grad()
def prefill(model, ids, args, cache=None):
    """The prompt through the model (dense) into ``cache`` (a new DynamicCache by default): (seconds, cache, next
    token)."""
    _sync(args.device)
    begin = time.perf_counter()
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    _sync(args.device)
    return time.perf_counter() - begin, cache, out.logits[:, -1:].argmax(-1)


def eager_rows(model, ids, modes, args) -> list[dict]:
    """The DynamicCache modes, each decode step run from Python; speedups against ``dense``."""
    n = ids.shape[1]
    prefill_s, cache, token = prefill(model, ids, args)
    results = []
    try:
        micro = attention_micro(model, cache, args)
    except Exception as err:
        logging.exception("micro benchmark at N=%d failed", n)
        micro = {"error": f"{type(err).__name__}: {err}"}
    results.append({"context": n, "mode": "micro", **micro})
    print(json.dumps(results[-1]))
    rows = {}
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
            row["baseline"] = "dense"
        results.append({"context": n, "mode": mode, "prefill_s": prefill_s, **row})
        print(json.dumps(results[-1]))
    return results


def graph_rows(model, ids, modes, args) -> list[dict]:
    """The StaticCache modes with CUDA-graph replay; Top-k against the fastest dense attention measured (the two
    graph dense modes and SDPA over the exact valid prefix) and the fastest dense decode step."""
    n = ids.shape[1]
    positions = n + args.warmup + args.steps + 64  # + 64 unused positions, poisoned by the dense check
    prefill_s, cache, token = prefill(model, ids, args, static_cache(model, -(-positions // 256) * 256))
    rows = {}
    for mode in modes:
        try:
            rows[mode] = run_graph_mode(model, cache, n, token, mode, args)
        except Exception as err:
            logging.exception("mode %s at N=%d failed", mode, n)
            rows[mode] = {"error": f"{type(err).__name__}: {err}"}
    dense_attention_ms, dense_tokens = {}, {}
    for mode in ("graph-dense", "graph-dense-flash"):
        row = rows.get(mode, {})
        if "error" in row or not row:
            continue
        if row["rel_error_vs_prefix_sdpa"] > 2e-2:  # not dense attention over the valid keys: no baseline
            logging.warning("%s differs from SDPA over the valid keys (rel. error %.3g); not a baseline", mode,
                            row["rel_error_vs_prefix_sdpa"])
            continue
        dense_attention_ms[mode] = row["attention_ms"]
        dense_attention_ms["prefix SDPA"] = row["prefix_sdpa_ms"]
        dense_tokens[mode] = row["tokens_per_s"]
    results = []
    for mode, row in rows.items():
        if "error" not in row and dense_attention_ms:
            baseline = min(dense_attention_ms, key=dense_attention_ms.get)
            row["attention_speedup"] = dense_attention_ms[baseline] / row["attention_ms"]
            row["baseline"] = baseline
            fastest = max(dense_tokens, key=dense_tokens.get)
            row["tokens_speedup"] = row["tokens_per_s"] / dense_tokens[fastest]
            row["tokens_baseline"] = fastest
        results.append({"context": n, "mode": mode, "prefill_s": prefill_s, **row})
        print(json.dumps(results[-1]))
    return results


def print_table(results: list[dict]) -> None:
    print(f"\n{'N':>7} {'mode':>17} {'attn ms/step':>13} {'x dense':>8} {'host ms':>8} {'step ms':>8} {'tok/s':>8} "
          f"{'x dense':>8}  baseline")
    for row in results:
        if row["mode"] == "micro" and "error" not in row:
            timings = ", ".join(f"{name} {value:.3f}" for name, value in row.items() if name.endswith("_ms"))
            print(f"{row['context']:>7} {'one layer':>17} {timings}")
            continue
        if "error" in row:
            print(f"{row['context']:>7} {row['mode']:>17} {row['error']}")
            continue
        host = f"{row['attention_host_ms']:>8.3f}" if "attention_host_ms" in row else f"{'-':>8}"
        extra = ""
        if "prefix_sdpa_ms" in row:
            extra = f"; prefix SDPA {row['prefix_sdpa_ms']:.3f} ms, rel. error {row['rel_error_vs_prefix_sdpa']:.1e}"
        print(f"{row['context']:>7} {row['mode']:>17} {row['attention_ms']:>13.3f} "
              f"{row.get('attention_speedup', float('nan')):>8.2f} {host} {row['step_ms']:>8.2f} "
              f"{row['tokens_per_s']:>8.1f} {row.get('tokens_speedup', float('nan')):>8.2f}  "
              f"{row.get('baseline', '-')}{extra}")


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
    parser.add_argument("--modes", default=",".join(EAGER_MODES + GRAPH_MODES),
                        help="eager: dense, topk-{head,group,layer}; static cache + CUDA graph: graph-dense, "
                             "graph-dense-flash, graph-topk-{head,group}")
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
    if args.device == "cpu" and "graph-dense-flash" in modes:
        logging.warning("skipping graph-dense-flash on the CPU (flash attention needs CUDA)")
        modes.remove("graph-dense-flash")

    if args.device != "cpu" and not args.allow_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)  # dense baseline on flash / memory-efficient SDPA
    model = build_model(args.tiny, args.layers, args.device)
    from topklab import kernels

    card = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    import transformers

    meta = {"card": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "transformers": transformers.__version__, "k": args.k,
            "layers": args.layers, "steps": args.steps, "warmup": args.warmup, "cudnn_sdpa": args.allow_cudnn,
            "cuda_graph": args.device != "cpu",
            "kernels": sorted(name for name in dir(kernels) if not name.startswith("_"))}
    print(json.dumps(meta))
    results = []
    generator = torch.Generator().manual_seed(0)
    for n in contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=generator).to(args.device)
        for family, run in (("eager", eager_rows), ("graph", graph_rows)):
            family_modes = [m for m in modes if (m in GRAPH_MODES) == (family == "graph")]
            if not family_modes:
                continue
            try:
                results += run(model, ids, family_modes, args)
            except Exception as err:  # keep the other family's numbers from a one-shot device run
                logging.exception("%s modes at N=%d failed", family, n)
                results.append({"context": n, "mode": f"{family} prefill", "error": f"{type(err).__name__}: {err}"})
            if args.device != "cpu":
                torch.cuda.empty_cache()
    print_table(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
