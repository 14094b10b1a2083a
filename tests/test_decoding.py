"""Top-k decoding through transformers' attention registry: equivalences, state, padding, fidelity, errors."""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass

import pytest
import torch

from topklab.decoding.generate import (
    GreedyStep,
    add_generate_arguments,
    greedy_generate,
    prefill_static,
    run_generate,
)
from topklab.decoding.hf import cache_keyword, static_cache
from topklab.decoding.topk_attention import (
    enable_topk_attention,
    masked_topk_attention,
    topk_attention,
)
from topklab.indexers.exact import Exact
from topklab.models import TINY_FAMILIES, tiny_model

pytest.importorskip("transformers")


def _model(family: str = "llama"):
    # Gemma3's first five layers are sliding-window ones; six layers give it one global layer to sparsify.
    return tiny_model(family, layers=6 if family == "gemma3" else 2)


def _prompt(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, steps=8, attention_mask=None, **kwargs):
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


def _prefill_then_step(model, prompt, rest) -> torch.Tensor:
    """Logits of ``rest``, fed one token at a time after ``prompt`` (the cache keyword is ``cache`` in recent
    transformers, ``past_key_values`` before)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    keyword = cache_keyword(model)
    model(prompt, **{keyword: cache})
    return torch.cat([model(rest[:, i : i + 1], **{keyword: cache}).logits for i in range(rest.shape[1])], dim=1)


@dataclass(eq=False)
class CountingExact(Exact):
    """The exact indexer, counting build and add calls across all copies."""

    calls = {"build": 0, "add": 0}

    def _build(self, keys):
        CountingExact.calls["build"] += 1
        super()._build(keys)

    def _add(self, keys):
        CountingExact.calls["add"] += 1
        super()._add(keys)


@dataclass(eq=False)
class HiddenExact(Exact):
    """A stand-in for a learned hidden-state indexer: exact inner products between attention-input hidden states."""

    source = "hidden"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_k_at_least_context_reproduces_dense_generation(family):
    model = _model(family)
    ids = _prompt(24, seed=1)
    dense = _generate(model, ids)
    for per in ("head", "group", "layer"):
        with topk_attention(model, "exact", k=64, per=per) as handle:
            assert handle.sparse_layers  # something is actually patched
            assert torch.equal(_generate(model, ids), dense), per


def test_gemma3_sliding_layers_stay_dense():
    model = _model("gemma3")
    with topk_attention(model, "exact", k=4) as handle:
        assert handle.sparse_layers == [5]


@pytest.mark.parametrize("per", ["head", "group", "layer"])
@pytest.mark.parametrize("k,sinks,window", [(5, 0, 0), (0.2, 2, 3)])
def test_decode_steps_match_the_masked_reference(per, k, sinks, window):
    """Decoding token by token through the indexer equals one masked pass over the whole sequence."""
    model = _model("qwen3")
    ids = _prompt(30, seed=2)
    prompt, rest = ids[:, :20], ids[:, 20:]
    options = dict(k=k, per=per, sinks=sinks, window=window, prefill="sparse")
    with torch.no_grad(), topk_attention(model, "exact", **options):
        reference = model(ids).logits[:, 20:]
        stepped = _prefill_then_step(model, prompt, rest)
    torch.testing.assert_close(stepped, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = model(ids).logits[:, 20:]
    assert (plain - reference).abs().max() > 1e-3, "small k should change the logits"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("indexer,k,sinks,per", [("exact", 64, 0, "head"), ("exact", 64, 0, "group"),
                                                 ("exact", 0.1, 3, "head"), ("oracle:p=1", 48, 2, "group")])
def test_cuda_decode_steps_match_the_masked_reference(indexer, k, sinks, per):
    """On CUDA the steps run the Triton kernels (fused select+attend, selection, sparse attention)."""
    model = tiny_model("llama", layers=2, hidden=256, heads=8, kv_heads=2).cuda()
    ids = _prompt(700, seed=12).cuda()
    prompt, rest = ids[:, :680], ids[:, 680:]
    with torch.no_grad():
        with topk_attention(model, "exact", k=k, per=per, sinks=sinks, prefill="sparse"):
            reference = model(ids).logits[:, 680:]
        with topk_attention(model, indexer, k=k, per=per, sinks=sinks, prefill="sparse"):
            stepped = _prefill_then_step(model, prompt, rest)
    torch.testing.assert_close(stepped, reference, rtol=2e-3, atol=2e-3)


def test_oracle_with_p_1_equals_exact():
    model = _model("llama")
    ids = _prompt(32, seed=3)
    with topk_attention(model, "exact", k=6):
        exact = _generate(model, ids, steps=10)
    with topk_attention(model, "oracle:p=1", k=6):
        oracle = _generate(model, ids, steps=10)
    assert torch.equal(exact, oracle)
    # sparse prefill: oracle goes position by position through the indexer, exact through the masked pass
    with torch.no_grad():
        with topk_attention(model, "exact", k=6, per="group", prefill="sparse"):
            masked = model(ids).logits
        with topk_attention(model, "oracle:p=1", k=6, per="group", prefill="sparse"):
            stepwise = model(ids).logits
    torch.testing.assert_close(stepwise, masked, rtol=1e-4, atol=1e-4)


def test_small_k_changes_generation():
    model = _model("llama")
    ids = _prompt(48, seed=4)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    dense = model.generate(ids, **kwargs)
    with topk_attention(model, "exact", k=2):
        sparse = model.generate(ids, **kwargs)
    # the first token comes from the (dense) prefill; every later step decodes with Top-k
    torch.testing.assert_close(sparse.logits[0], dense.logits[0])
    assert (sparse.logits[1] - dense.logits[1]).abs().max() > 1e-3


@pytest.mark.parametrize("per,prefill,indexer", [("head", "dense", "exact"), ("layer", "dense", "exact"),
                                                 ("group", "sparse", "exact"), ("head", "dense", "oracle:p=0.5")])
def test_left_padded_batch_equals_sequences_one_by_one(per, prefill, indexer):
    """Also for a stochastic indexer (the random oracle): rows 0 and 2 share a start, yet each draws alone."""
    model = _model("mistral")
    lengths = [30, 22, 30, 17]
    prompts = [_prompt(n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    options = dict(k=0.25, per=per, sinks=1, window=2, prefill=prefill)
    with topk_attention(model, indexer, **options):
        batched = _generate(model, ids, steps=10, attention_mask=mask)
        alone = [_generate(model, prompt[None], steps=10)[0] for prompt in prompts]
    for row, tokens in enumerate(alone):
        assert torch.equal(batched[row], tokens), f"sequence {row}"


def test_context_restores_dense_attention():
    model = _model("qwen2")
    ids = _prompt(40, seed=5)
    before = model.config._attn_implementation
    dense = _generate(model, ids)
    with topk_attention(model, "exact", k=2):
        assert model.config._attn_implementation != before
        assert not torch.equal(_generate(model, ids), dense)
    assert model.config._attn_implementation == before
    assert torch.equal(_generate(model, ids), dense)
    handle = enable_topk_attention(model, "exact", k=2)
    handle.restore()
    handle.restore()  # idempotent
    assert torch.equal(_generate(model, ids), dense)


def test_indexer_is_built_once_then_extended():
    model = _model("llama")
    ids = _prompt(30, seed=6)
    CountingExact.calls.update(build=0, add=0)
    steps = 9
    with topk_attention(model, CountingExact(), k=4) as handle:
        _generate(model, ids, steps=steps)
        layers = len(handle.sparse_layers)
        # the prompt goes through dense prefill; the first decode step builds, each later one adds one key
        assert CountingExact.calls == {"build": layers, "add": layers * (steps - 2)}
        state = handle._states[handle.sparse_layers[0]]
        assert state.indexers[0].n == ids.shape[1] + steps - 1
        _generate(model, ids, steps=steps)  # a new sequence: a fresh index
        assert CountingExact.calls == {"build": 2 * layers, "add": 2 * layers * (steps - 2)}


def test_recorder_recall_is_one_for_exact_and_p_for_oracle():
    model = _model("qwen3")
    ids = _prompt(40, seed=7, batch=2)
    steps, k = 6, 10
    with topk_attention(model, "exact", k=k, record=True) as handle:
        _generate(model, ids, steps=steps)
    frame = handle.recorder.frame()
    heads = model.config.num_attention_heads
    assert len(frame) == (steps - 1) * 2 * heads * len(handle.sparse_layers)
    assert set(frame.columns) >= {"step", "layer", "head", "kv_head", "seq", "indexer", "k", "context", "recall",
                                  "mass_recall", "output_error"}
    assert (frame.recall == 1.0).all()
    torch.testing.assert_close(torch.tensor(frame.mass_recall.values), torch.tensor(frame.exact_mass_recall.values))
    assert frame.context.tolist()[:heads] == [41] * heads
    assert frame.kv_head.max() == model.config.num_key_value_heads - 1
    with topk_attention(model, "oracle:p=0.6", k=k, per="group", record=True) as handle:
        _generate(model, ids, steps=steps)
    frame = handle.recorder.frame()
    assert frame.recall.unique().tolist() == [pytest.approx(0.6)]
    assert frame.mass_recall.mean() < frame.exact_mass_recall.mean()  # per group, single heads may do better
    assert (frame.output_error > 0).all()


def test_ratio_k_reads_as_a_share_of_the_context():
    model = _model("llama")
    ids = _prompt(40, seed=8)
    with topk_attention(model, "exact", k=0.1, record=True) as handle:
        _generate(model, ids, steps=4)
    frame = handle.recorder.frame()
    assert (frame.k == [math.ceil(0.1 * c) for c in frame.context]).all()


def test_ratio_k_counts_alike_in_decoding_and_the_masked_pass():
    """One rounding for a ratio everywhere: decoding (`resolve_k`) and sparse prefill / training (the masked pass)
    keep the same number of keys, and a decimal ratio keeps what it says (0.07 of 100 keys is 7)."""
    from topklab.decoding.topk_attention import _resolve_k_per_query, resolve_k

    contexts = torch.arange(1, 5001)
    for ratio in (0.01, 0.02, 0.05, 0.07, 0.1, 0.2, 0.25, 0.3, 1 / 3, 1.0):
        want = torch.tensor([resolve_k(ratio, int(c)) for c in contexts])
        assert torch.equal(_resolve_k_per_query(ratio, contexts), want), ratio
    assert resolve_k(0.07, 100) == 7 and resolve_k(0.3, 50) == 15 and resolve_k(0.3, 51) == 16
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 50, 8), torch.eye(50).expand(1, 2, 50, 50)
    probs = masked_topk_attention(q, k, v, torch.ones(1, 1, 50, dtype=torch.bool), k=0.3)
    assert ((probs[0, 0] > 0).sum(-1) == 15).all()


def test_hidden_state_indexer_selects_per_layer():
    model = _model("llama")
    ids = _prompt(30, seed=9)
    dense = _generate(model, ids)
    with topk_attention(model, HiddenExact(), k=64) as handle:
        assert handle.per == "layer"
        assert torch.equal(_generate(model, ids), dense)
    with topk_attention(model, HiddenExact(), k=3, record=True) as handle:
        sparse = _generate(model, ids)
        frame = handle.recorder.frame()
        assert handle._states[0].indexers[0].n == ids.shape[1] + 7
    assert not torch.equal(sparse, dense)
    assert frame.recall.between(0, 1).all() and len(frame)
    with pytest.raises(ValueError, match="per='layer'"):
        topk_attention(model, HiddenExact(), k=3, per="head").__enter__()


def test_masked_reference_over_all_keys_is_dense_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 3, 16), torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 16)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.3).transpose(1, 2)
    everything = torch.ones(2, 3, 20, dtype=torch.bool)
    for per in ("head", "group", "layer"):
        out = masked_topk_attention(q, k, v, everything, k=20, per=per, scale=0.3)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_masked_reference_keeps_sinks_window_and_top_keys():
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 12, 8)
    v = torch.eye(12)[None, None, :, :]  # the output is the attention distribution itself
    valid = torch.ones(1, 1, 12, dtype=torch.bool)
    valid[..., :2] = False  # two padded keys
    probs = masked_topk_attention(q, k, v, valid, k=3, sinks=1, window=2)[0, 0, 0]
    scores = (q[0, 0, 0] @ k[0, 0].T).masked_fill(~valid[0, 0], -math.inf)
    expected = set(scores.topk(3).indices.tolist()) | {2, 10, 11}
    assert set(torch.nonzero(probs).flatten().tolist()) == expected


def test_soft_capped_attention_is_refused_up_front():
    """Gemma2 soft-caps its logits: neither the Top-k scores nor the SDPA fallback would apply the cap."""
    import transformers

    config = transformers.Gemma2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=256,
                                       sliding_window=8)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="soft-caps its attention logits"):
        enable_topk_attention(model, "exact", k=4)


def test_bad_configurations_raise_clear_errors():
    model = _model("llama")
    with pytest.raises(ValueError, match="k must be >= 1"):
        enable_topk_attention(model, k=0)
    with pytest.raises(ValueError, match=r"ratio .* \(0, 1\]"):
        enable_topk_attention(model, k=1.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        enable_topk_attention(model, k=0.0)
    with pytest.raises(TypeError, match="k must be"):
        enable_topk_attention(model, k=True)
    with pytest.raises(ValueError, match=r"layer\(s\) \[7\]"):
        enable_topk_attention(model, k=4, dense_layers=[0, 7])
    with pytest.raises(ValueError, match="unknown indexer"):
        enable_topk_attention(model, "nosuch:x=1", k=4)
    with pytest.raises(ValueError, match="not trained"):
        enable_topk_attention(model, "lightning", k=4)
    with pytest.raises(ValueError, match="per must be"):
        enable_topk_attention(model, k=4, per="token")
    with pytest.raises(ValueError, match="prefill must be"):
        enable_topk_attention(model, k=4, prefill="lazy")
    with pytest.raises(ValueError, match="sinks must be"):
        enable_topk_attention(model, k=4, sinks=-1)
    with pytest.raises(ValueError, match="no entry for layer 1"):
        enable_topk_attention(model, {0: "exact"}, k=4)
    with pytest.raises(ValueError, match="does not dispatch attention"):
        enable_topk_attention(torch.nn.Linear(2, 2), k=4)
    assert model.config._attn_implementation == "sdpa"  # nothing stays patched after a failed setup


def test_right_padding_is_rejected():
    model = _model("llama")
    ids = _prompt(20, seed=11, batch=2)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with topk_attention(model, "exact", k=4), pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=mask)


@contextlib.contextmanager
def _no_host_reads():
    """Every way a tensor's value reaches the host (a sync on CUDA, fatal inside a CUDA graph) raises instead."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")
        return read

    for name in names:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("options", [
    None,  # dense: the static-cache helper itself
    dict(k=4, per="head"),
    dict(k=4, per="group", prefill="sparse"),  # sparse prefill: transformers passes no mask, the cache its buffer
    dict(k=0.2, per="head", sinks=1, window=2),  # host path: ratio k, sinks and window
    dict(k=4, per="layer"),
], ids=["dense", "head", "group-sparse-prefill", "ratio-sinks-window", "layer"])
def test_static_cache_decoding_equals_dynamic_cache(options):
    model = _model("llama")
    ids = _prompt(40, seed=20, batch=2)
    with topk_attention(model, "exact", **options) if options else contextlib.nullcontext():
        dynamic = _generate(model, ids, steps=10)
        static = greedy_generate(model, ids, 10, max_cache_len=64)
    assert torch.equal(static, dynamic)
    if options:
        assert not torch.equal(static, _generate(model, ids, steps=10)), "small k should change the tokens"


@torch.no_grad()
def _poisoned_static_step(model, ids, max_cache_len: int, cuda_graph: bool = False, mask=None) -> GreedyStep:
    """A static cache prefilled with ``ids`` (left-padded where ``mask`` is 0), its unwritten positions and each
    sequence's padding filled with large random keys and values (a step that attends outside the valid keys picks
    them), and the `GreedyStep` that continues from it."""
    step = prefill_static(model, ids, max_cache_len, attention_mask=mask, cuda_graph=cuda_graph)
    generator = torch.Generator(device=ids.device).manual_seed(5)
    pads = [0] * ids.shape[0] if mask is None else (mask.shape[1] - mask.sum(-1)).tolist()
    for layer in step.cache.layers:
        for buffer in (layer.keys, layer.values):
            for row, pad in enumerate(pads):
                for span in (buffer[row, :, ids.shape[1]:], buffer[row, :, :pad]):
                    span.copy_(50 * torch.randn(span.shape, generator=generator, device=ids.device))
    return step


def _left_padded(lengths: list[int], seed: int):
    """A left-padded batch of prompts of these lengths and its attention mask."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = _prompt(n, seed=seed + row)[0]
        mask[row, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("per", ["head", "group"])
def test_static_decode_steps_read_nothing_on_the_host(per):
    """What makes a step capturable in a CUDA graph: after the prefill, no tensor value is read on the host, and
    the valid length still comes through (the cache's unwritten positions are poisoned)."""
    model = _model("qwen3")
    ids = _prompt(30, seed=21)
    with topk_attention(model, "exact", k=5, per=per) as handle:
        assert handle.sync_free_decode
        step = _poisoned_static_step(model, ids, 48)
        with _no_host_reads():
            steps = [step().clone() for _ in range(6)]
        assert torch.equal(torch.cat(steps, 1), _generate(model, ids, steps=7)[:, 1:])
    with topk_attention(model, "exact", k=5, per=per, sinks=1) as handle:
        assert not handle.sync_free_decode
        step = _poisoned_static_step(model, ids, 48)
        with _no_host_reads(), pytest.raises(AssertionError, match="host read"):
            step()


@pytest.mark.parametrize("per", ["head", "group"])
def test_left_padded_static_decode_reads_nothing_on_the_host(per):
    """A left-padded batch too: each sequence's valid keys [start, end) come from the mask on the device (the
    padding and the unwritten positions are poisoned), and the tokens are transformers' own for that batch."""
    model = _model("qwen3")
    ids, mask = _left_padded([30, 21, 26], seed=40)
    with topk_attention(model, "exact", k=5, per=per) as handle:
        step = _poisoned_static_step(model, ids, 48, mask=mask)
        assert handle._layout == (0, 9, 4)
        with _no_host_reads():
            steps = [step().clone() for _ in range(6)]
        assert torch.equal(torch.cat(steps, 1), _generate(model, ids, steps=7, attention_mask=mask)[:, 1:])


def test_left_padded_batch_with_static_cache_equals_dynamic_cache():
    model = _model("mistral")
    ids, mask = _left_padded([30, 22, 17], seed=30)
    dense = greedy_generate(model, ids, 8, attention_mask=mask, max_cache_len=48)
    assert torch.equal(dense, _generate(model, ids, steps=8, attention_mask=mask))
    for options in (dict(k=4, per="head"), dict(k=0.25, per="group", sinks=1, window=2)):
        with topk_attention(model, "exact", **options) as handle:
            dynamic = _generate(model, ids, steps=8, attention_mask=mask)
            static = _generate(model, ids, steps=8, attention_mask=mask, cache_implementation="static")
            greedy = greedy_generate(model, ids, 8, attention_mask=mask, max_cache_len=48)
            assert handle._layout == (0, 8, 13)
        assert torch.equal(static, dynamic) and torch.equal(greedy, dynamic), options
        assert not torch.equal(greedy, dense)


def test_greedy_decoding_rejects_bad_input():
    model = _model("llama")
    ids = _prompt(10, seed=22)
    cache = static_cache(model, 16)
    with pytest.raises(ValueError, match="CUDA device"):
        GreedyStep(model, cache, ids[:, -1:], cuda_graph=True)
    with pytest.raises(ValueError, match=r"\[batch, 1\]"):
        GreedyStep(model, cache, ids)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        greedy_generate(model, ids, 0)
    with pytest.raises(ValueError, match="cannot hold"):
        greedy_generate(model, ids, 8, max_cache_len=12)
    with pytest.raises(ValueError, match="needs both attention_mask"):
        GreedyStep(model, cache, ids[:, -1:], attention_mask=torch.ones(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, max_cache_len\] = \[1, 16\]"):
        GreedyStep(model, cache, ids[:, -1:], attention_mask=torch.ones(1, 10, dtype=torch.long),
                   positions=torch.ones(1, 1, dtype=torch.long))  # the prompt's mask: new tokens would be masked
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GreedyStep(model, cache, ids[:, -1:], warmup=0)
    step = prefill_static(model, ids, 12)
    step(), step()
    with pytest.raises(ValueError, match="static cache of 12 positions is full after 2 steps"):
        step()
    with pytest.raises(ValueError, match="leaves no room"):
        prefill_static(model, ids, 10)
    with pytest.raises(ValueError, match="must match input_ids"):
        prefill_static(model, ids, 16, attention_mask=torch.ones(1, 9, dtype=torch.long))
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    with pytest.raises(ValueError, match="needs a CUDA --device"):  # before any model is loaded
        run_generate(parser.parse_args(["hello", "--k", "4", "--cuda-graph", "--device", "cpu"]))


def test_cuda_graph_cli_text_stops_at_end_of_sequence():
    from topklab.decoding.generate import _until_eos

    tokens = torch.tensor([5, 9, 2, 7, 2])
    assert _until_eos(tokens, 2).tolist() == [5, 9, 2]
    assert _until_eos(tokens, [7, 9]).tolist() == [5, 9]
    assert _until_eos(tokens, None).tolist() == tokens.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("per,batch", [(None, 1), ("head", 1), ("head", 2), ("group", 1), ("head", "padded"),
                                       ("group", "padded")])
def test_cuda_graph_static_decode_equals_eager(per, batch):
    """Steps replayed from a CUDA graph (static cache, device ranges, Triton kernels) give the eager tokens."""
    model = tiny_model("llama", layers=2, hidden=256, heads=8, kv_heads=2).cuda()
    if batch == "padded":
        ids, mask = (t.cuda() for t in _left_padded([700, 520, 611], seed=23))
    else:
        ids, mask = _prompt(700, seed=23, batch=batch).cuda(), None
    with topk_attention(model, "exact", k=64, per=per) if per else contextlib.nullcontext():
        dynamic = _generate(model, ids, steps=16, attention_mask=mask)[:, 1:]
        eager, graphed = (_poisoned_static_step(model, ids, 768, cuda_graph=graph, mask=mask)
                          for graph in (False, True))
        eager_tokens = torch.cat([eager().clone() for _ in range(15)], 1)
        graphed_tokens = torch.cat([graphed().clone() for _ in range(15)], 1)
    assert graphed.graph is not None and eager.graph is None
    assert torch.equal(graphed_tokens, eager_tokens)
    assert torch.equal(eager_tokens, dynamic)


@pytest.mark.slow
def test_smollm2_exact_topk_keeps_the_answer():
    from topklab.models import load_model

    model, tokenizer = load_model("smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    dense = _generate(model, ids, steps=6)
    with topk_attention(model, "exact", k=64):
        assert torch.equal(_generate(model, ids, steps=6), dense)
    with topk_attention(model, "exact", k=4, sinks=1, record=True) as handle:
        sparse = _generate(model, ids, steps=6)
    assert "Paris" in tokenizer.decode(sparse[0])
    assert (handle.recorder.frame().recall == 1.0).all()
