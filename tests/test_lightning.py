"""The Lightning indexer (learned, on hidden states) and its training-free variant (on the model's q and k)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from topklab.runtime import single_thread
from topklab.fidelity.metrics import recall_at_k
from topklab.fidelity.traces import LayerTrace
from topklab.indexers import make
from topklab.training import attention_target, distillation_kl, evaluate_kl

K = 16
EVAL_ROWS = torch.arange(320, 384, 4)


def planted_trace(seed: int = 0, length: int = 384, hidden_size: int = 32, q_heads: int = 1, dim: int = 16,
                  gain: float = 4.0, layer: int = 0) -> LayerTrace:
    """Attention an index can represent: q linear in the hidden states, k LayerNorm'd like the index key, one KV
    head; with one query head I = c q.k (two ReLU heads of opposite sign) reproduces its ranking exactly."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, length, hidden_size, generator=g)
    wq = torch.randn(q_heads, hidden_size, dim, generator=g) * gain / hidden_size**0.5
    wk = torch.randn(1, hidden_size, dim, generator=g) / hidden_size**0.5
    q = torch.einsum("btD,hDd->bhtd", hidden, wq)
    k = torch.nn.functional.layer_norm(torch.einsum("btD,hDd->bhtd", hidden, wk), (dim,))
    return LayerTrace(layer=layer, q=q, k=k, v=torch.randn(k.shape, generator=g), hidden=hidden, scale=dim**-0.5,
                      prompt_len=length)


def causal_recall(indexer, trace: LayerTrace) -> float:
    """Recall@K against the Top-K of the head-summed attention, each query searching the keys up to itself."""
    rows = EVAL_ROWS.to(trace.q.device)
    true = attention_target(trace.q[0], trace.k[0], trace.scale, rows).topk(K, dim=-1).indices
    recalls = []
    for row, t in enumerate(EVAL_ROWS.tolist()):
        indexer.build(trace.hidden[:, : t + 1])
        pred = indexer.search(trace.hidden[:, t : t + 1], K)[0]
        recalls.append(float(recall_at_k(pred, true[row : row + 1])))
    return sum(recalls) / len(recalls)


SPEC = "lightning:heads=4,dim=16,rope=0,lr=1e-2,steps=300,fp8=false"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread is as fast, and immune to the slowdown of threads on a busy machine."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def trace() -> LayerTrace:
    return planted_trace()


@pytest.fixture(scope="module")
def trained(trace):
    return make(SPEC).fit([trace])


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    return trained.save(tmp_path_factory.mktemp("lightning") / "layer0.safetensors")


# -- the training target and loss ---------------------------------------------------------------------------------
def test_attention_target_matches_brute_force():
    trace = planted_trace(seed=1, length=40, q_heads=4)
    trace.k = torch.cat([trace.k, 2 * trace.k], dim=1)  # two KV heads, two query heads each
    rows = torch.tensor([0, 7, 39])
    got = attention_target(trace.q[0], trace.k[0], trace.scale, rows)
    want = torch.zeros(len(rows), 40)
    for i, t in enumerate(rows.tolist()):
        for h in range(4):
            logits = torch.tensor([float(trace.q[0, h, t] @ trace.k[0, h // 2, s]) * trace.scale for s in range(t + 1)])
            want[i, : t + 1] += torch.softmax(logits, 0) / 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_distillation_kl_is_causal_kl():
    g = torch.Generator().manual_seed(3)
    rows = torch.tensor([2, 5])
    target = torch.softmax(torch.randn(2, 8, generator=g).masked_fill(torch.arange(8) > rows[:, None], -math.inf), -1)
    logits = torch.randn(2, 8, generator=g)
    want = 0.0
    for i, t in enumerate(rows.tolist()):
        p, log_q = target[i, : t + 1], torch.log_softmax(logits[i, : t + 1], 0)
        want += float((p * (p.log() - log_q)).sum()) / 2
    assert float(distillation_kl(logits, target, rows)) == pytest.approx(want, rel=1e-5)
    assert float(distillation_kl(target.clamp_min(1e-30).log(), target, rows)) == pytest.approx(0.0, abs=1e-5)


# -- learning ------------------------------------------------------------------------------------------------------
def test_fit_learns_planted_attention(trace, trained):
    untrained = make(SPEC.replace("steps=300", "steps=0")).fit([trace])  # same seeded init, no steps
    before, after = evaluate_kl(untrained.net, [trace]), evaluate_kl(trained.net, [trace])
    assert after < 0.2 * before, (before, after)
    assert evaluate_kl(trained.net, [trace], chunk=37) == pytest.approx(after, rel=1e-4)
    assert len(trained.history) == 300
    recall, random = causal_recall(trained, trace), K / float(EVAL_ROWS.float().mean() + 1)  # random ~ 0.045
    assert recall > max(0.7, 10 * random), recall
    assert causal_recall(untrained, trace) < 0.3


def test_fit_is_seeded(trace):
    first = make("lightning:dim=16,rope=8,steps=5").fit([trace]).history
    assert first == make("lightning:dim=16,rope=8,steps=5").fit([trace]).history
    assert first != make("lightning:dim=16,rope=8,steps=5,seed=1").fit([trace]).history


def test_fp8_recall_close_to_fp32(trace, trained, checkpoint):
    fp8 = make(f"lightning:heads=4,dim=16,rope=0,ckpt={checkpoint}")
    pow2 = make(f"lightning:heads=4,dim=16,rope=0,pow2=true,ckpt={checkpoint}")
    full = causal_recall(trained, trace)
    assert abs(causal_recall(fp8, trace) - full) < 0.05
    assert abs(causal_recall(pow2, trace) - full) < 0.08


def test_rope_trains_and_add_equals_build(trace):
    indexer = make("lightning:heads=2,dim=16,rope=8,steps=20").fit([trace])
    indexer.build(trace.hidden[:, :300])
    indexer.add(trace.hidden[:, 300:350])
    grown = indexer.search(trace.hidden[:, 340:350], K)
    assert torch.equal(grown, indexer.build(trace.hidden[:, :350]).search(trace.hidden[:, 340:350], K))


# -- checkpoints ---------------------------------------------------------------------------------------------------
def test_save_load_round_trip(trace, trained, checkpoint):
    loaded = make(SPEC.replace("steps=300", "steps=7") + f",ckpt={checkpoint}")
    assert loaded.fit([trace]) is loaded and loaded.history == []  # a checkpoint is used as saved, not refitted
    for indexer in (trained, loaded):
        indexer.build(trace.hidden[:, :300])
    assert torch.equal(trained.search(trace.hidden[:, 250:300], K), loaded.search(trace.hidden[:, 250:300], K))


def test_checkpoint_errors(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"heads=4 \(spec says 8\)"):
        make(f"lightning:heads=8,dim=16,rope=0,ckpt={checkpoint}")
    with pytest.raises(ValueError, match=r"rope=0 \(spec says 32\)"):
        make(f"lightning:heads=4,dim=64,ckpt={checkpoint}")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make(f"lightning:ckpt={tmp_path / 'missing.safetensors'}")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a Lightning indexer checkpoint"):
        make(f"lightning:ckpt={tmp_path / 'other.safetensors'}")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(Path(checkpoint).read_bytes()[:-64])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        make(f"lightning:heads=4,dim=16,rope=0,ckpt={cut}")


# -- spec and input errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ("lightning:dim=48", "power of two"),
    ("lightning:dim=256", "power of two"),
    ("lightning:heads=0", "heads must be >= 1"),
    ("lightning:rope=3", "must be even"),
    ("lightning:dim=16", r"rope .* in \[0, dim=16\]"),
    ("lightning:lr=0", "lr > 0"),
    ("lightning:steps=-1", "steps >= 0"),
    ("lightning:fp8=maybe", "not a valid bool"),
    ("lightning:head=4", "unknown parameter"),
    ("lightning-qk:relu=2", "not a valid bool"),
])
def test_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        make(spec)


def test_input_errors(trace, trained):
    with pytest.raises(ValueError, match="not trained"):
        make("lightning").build(trace.hidden)
    with pytest.raises(ValueError, match="trained on hidden size 32"):
        trained.build(torch.randn(1, 10, 48))
    no_hidden = LayerTrace(0, trace.q, trace.k, trace.v, None, trace.scale, trace.prompt_len)
    with pytest.raises(ValueError, match="hidden states"):
        make("lightning:dim=16,rope=0").fit([no_hidden])
    with pytest.raises(ValueError, match="one layer at a time"):
        make("lightning:dim=16,rope=0").fit([trace, planted_trace(layer=1)])
    with pytest.raises(ValueError, match="power-of-two dim"):
        make("lightning-qk").build(torch.randn(1, 10, 48))


# -- shapes and cost -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8, per_key", [(True, 16 + 4), (False, 16 * 4)])
def test_shapes_and_cost(trained, checkpoint, fp8, per_key):
    indexer = make(f"lightning:heads=4,dim=16,rope=0,fp8={fp8},ckpt={checkpoint}")
    hidden = torch.randn(2, 60, 32, generator=torch.Generator().manual_seed(5))
    indexer.build(hidden[:, :50])
    assert indexer.cost.index_bytes == 2 * 50 * per_key
    indexer.add(hidden[:, 50:])
    assert indexer.n == 60 and indexer.cost.index_bytes == 2 * 60 * per_key
    out = indexer.search(hidden[:, 55:], 8)
    assert out.shape == (2, 5, 8) and out.dtype == torch.int64 and int(out.min()) >= 0 and int(out.max()) < 60
    assert indexer.cost.bytes_read == 60 * per_key + 4 * (per_key + 4)  # keys + (index queries, head weights)
    assert indexer.cost.keys_scored == 0
    assert (make("lightning").source, make("lightning").trainable) == ("hidden", True)


# -- the training-free variant -------------------------------------------------------------------------------------
def _qk(seed=7, lead=(2, 3), n=200, m=5, d=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, m, d, generator=g), torch.randn(*lead, n, d, generator=g)


def test_qk_fp32_is_exact_relu_topk():
    queries, keys = _qk()
    brute = torch.relu(torch.einsum("bhmd,bhnd->bhmn", queries, keys))
    got = make("lightning-qk:fp8=false").build(keys).search(queries, K)
    assert got.shape == (2, 3, 5, K)
    assert torch.equal(got.sort(-1).values, brute.topk(K, -1).indices.sort(-1).values)
    exact = torch.einsum("bhmd,bhnd->bhmn", queries, keys).topk(K, -1).indices
    linear = make("lightning-qk:fp8=false,relu=false").build(keys).search(queries, K)
    assert torch.equal(linear.sort(-1).values, exact.sort(-1).values)


def test_qk_fp8_close_to_exact_and_cost():
    queries, keys = _qk()
    exact = torch.einsum("bhmd,bhnd->bhmn", queries, keys).topk(K, -1).indices
    indexer = make("lightning-qk:relu=false").build(keys[..., :150, :])
    indexer.add(keys[..., 150:, :])
    assert float(recall_at_k(indexer.search(queries, K), exact).mean()) > 0.85
    assert indexer.cost.bytes_read == 201 * (64 + 4) and indexer.cost.keys_scored == 0
    assert indexer.cost.index_bytes == 6 * 200 * (64 + 4)


def test_qk_relu_ties_when_scores_are_negative():
    """Keys all below zero for a query score 0: the ReLU variant cannot rank them (why it is a weak baseline)."""
    queries, keys = _qk(n=50, m=1, lead=(1,))
    keys = keys - 10 * queries  # q.k < 0 for every key
    assert bool((torch.einsum("bmd,bnd->bmn", queries, keys) < 0).all())
    exact = torch.einsum("bmd,bnd->bmn", queries, keys).topk(K, -1).indices
    relu = make("lightning-qk:fp8=false").build(keys).search(queries, K)
    linear = make("lightning-qk:fp8=false,relu=false").build(keys).search(queries, K)
    assert torch.equal(linear.sort(-1).values, exact.sort(-1).values)
    assert float(recall_at_k(relu, exact).mean()) < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_and_fp8_search(trace):
    cuda = LayerTrace(0, trace.q.cuda(), trace.k.cuda(), trace.v.cuda(), trace.hidden.cuda(), trace.scale, trace.prompt_len)
    full = make(SPEC).fit([cuda])
    assert next(full.net.parameters()).is_cuda
    fp8 = make(SPEC.replace("fp8=false", "fp8=true")).fit([cuda])
    assert fp8.history == pytest.approx(full.history, rel=1e-3)
    assert abs(causal_recall(fp8, cuda) - causal_recall(full, cuda)) < 0.05
    queries, keys = (t.cuda() for t in _qk())
    exact = torch.einsum("bhmd,bhnd->bhmn", queries, keys).topk(K, -1).indices
    assert float(recall_at_k(make("lightning-qk:relu=false").build(keys).search(queries, K), exact).mean()) > 0.85


def test_a_layers_indexer_is_refused_at_other_layers(trained, checkpoint):
    """A learned indexer projects one layer's hidden states: decoding refuses it at a layer it was not fitted on
    (the checkpoint keeps the layer), rather than use one layer's projections everywhere."""
    from topklab.decoding.topk_attention import enable_topk_attention
    from topklab.models import tiny_model

    assert trained.fitted_layer == 0
    loaded = make(f"lightning:heads=4,dim=16,rope=0,ckpt={checkpoint}")
    assert loaded.fitted_layer == 0
    model = tiny_model("llama", layers=2)
    for choice in (trained, f"lightning:heads=4,dim=16,rope=0,ckpt={checkpoint}", {0: trained, 1: trained}):
        with pytest.raises(ValueError, match="was fitted on layer 0, not 1"):
            enable_topk_attention(model, choice, k=4)
    enable_topk_attention(model, trained, k=4, dense_layers=[1]).restore()


def test_fit_leaves_the_global_generators_alone(trace):
    before = torch.random.get_rng_state()
    make(SPEC.replace("steps=300", "steps=2")).fit([trace])
    assert torch.equal(torch.random.get_rng_state(), before)
