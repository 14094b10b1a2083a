import dataclasses

import pytest
import torch

from topklab.indexers import available, default_specs, make, parameters, parse_spec
from topklab.indexers.base import KeyBuffer


def brute_force_topk(q, keys, k):
    """Score every pair in float64 and sort."""
    scores = torch.einsum("...md,...nd->...mn", q.double(), keys.double())
    return scores.argsort(dim=-1, descending=True, stable=True)[..., :k]


def assert_exact_topk(pred, q, keys, k):
    """pred is a Top-k: its float64 scores, best first, equal the true k best (fp32 may swap near-ties)."""
    scores = torch.einsum("...md,...nd->...mn", q.double(), keys.double())
    assert pred.shape[-1] == k and all(len(set(r.tolist())) == k for r in pred.reshape(-1, k))
    got = scores.gather(-1, pred)
    torch.testing.assert_close(got, scores.topk(k, dim=-1).values, atol=1e-4, rtol=0)


def test_parse_spec():
    assert parse_spec("ivf:nlist=256,nprobe=16") == ("ivf", {"nlist": "256", "nprobe": "16"})
    assert parse_spec(" exact ") == ("exact", {})
    for bad in ["", "oracle:p", "oracle:p=", "oracle:p=1,p=2", "oracle:=3"]:
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="available: .*exact.*oracle"):
        make("nope:x=1")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) q .*valid: p=1.0, fill=random"):
        make("oracle:q=0.5")


@pytest.mark.parametrize("spec,message", [
    ("oracle:p=abc", "not a valid float"), ("oracle:seed=1.5", "not a valid int"),
    ("oracle:fill=sideways", "sideways"), ("oracle:p=1.5", "p"),
    ("quant:rerank=nan", "must be a finite number"), ("lsh:rerank=inf", "must be a finite number"),
    ("quant:rerank=1e400", "must be a finite number"), ("lightning:lr=-inf", "must be a finite number"),
    ("ivf:seed=99999999999", r"seed must be in \[0, 2147483647\]"), ("hnsw:seed=-1", "seed must be in"),
    ("oracle:seed=9223372036854775808", "out of range"),
])
def test_bad_values(spec, message):
    """Refused when the spec is made, with the parameter named, not at build or search time deep inside."""
    with pytest.raises(ValueError, match=message):
        make(spec)


def test_float_parameters_survive_the_canonical_spec():
    """The spec in result tables rebuilds the very indexer that produced them (``:g`` alone would round 0.1234561)."""
    for value in (0.1234561, 0.5, 1e-07, 0.1, 1.0):
        indexer = make(f"oracle:p={value}")
        assert make(indexer.spec).p == value
    assert make("oracle:p=0.5").spec == "oracle:p=0.5" and make("quant:rerank=2").spec.endswith("rerank=2")
    assert make("oracle:seed=4294967296").seed == 2**32  # seeds FAISS never sees may be 64-bit


def test_spec_round_trip_for_every_example():
    for spec in default_specs():
        indexer = make(spec)
        assert make(indexer.spec).spec == indexer.spec
        assert set(parameters(indexer.name)) == {f.name for f in dataclasses.fields(indexer) if f.init}


def test_every_family_has_examples():
    assert {"exact", "oracle"} <= set(available())
    for name in available():
        assert any(s.split(":")[0] == name for s in default_specs()), name


def test_exact_matches_brute_force(rng):
    keys = torch.randn(2, 3, 257, 32, generator=rng)
    q = torch.randn(2, 3, 5, 32, generator=rng)
    for k in (1, 7, 64, 257):
        assert_exact_topk(make("exact").build(keys).search(q, k), q, keys, k)


def test_exact_add_appends_keys(rng):
    keys = torch.randn(1, 2, 100, 16, generator=rng)
    q = torch.randn(1, 2, 3, 16, generator=rng)
    planted = 10 * q[:, :, :1]  # a new key that the first query must rank first
    ix = make("exact").build(keys)
    for _ in range(40):  # grow past the buffer's capacity several times
        ix.add(torch.randn(1, 2, 1, 16, generator=rng))
    ix.add(planted)
    assert ix.n == 141
    assert (ix.search(q, 1)[:, :, 0, 0] == 140).all()
    full = torch.cat([keys, ix.keys.data[..., 100:, :]], dim=-2)
    assert_exact_topk(ix.search(q, 20), q, full, 20)


def test_key_buffer_amortised_growth(rng):
    buf = KeyBuffer(torch.randn(2, 4, 8, generator=rng))
    chunks = [torch.randn(2, n, 8, generator=rng) for n in (1, 3, 20, 1)]
    for c in chunks:
        buf.append(c)
    assert buf.n == 29 and buf.data.shape == (2, 29, 8)
    assert torch.equal(buf.data[:, -1:], chunks[-1])


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("fill", ["random", "next"])
def test_oracle_recall_is_exactly_p(rng, p, fill):
    from topklab.fidelity import recall_at_k

    keys = torch.randn(2, 2, 300, 16, generator=rng)
    q = torch.randn(2, 2, 4, 16, generator=rng)
    k = 20
    truth = make("exact").build(keys).search(q, k)
    pred = make(f"oracle:p={p},fill={fill},seed=3").build(keys).search(q, k)
    assert pred.unique(dim=-1).shape == pred.shape or all(len(set(r.tolist())) == k for r in pred.reshape(-1, k))
    assert torch.allclose(recall_at_k(pred, truth), torch.full(pred.shape[:-1], round(p * k) / k))


def test_oracle_next_fill_takes_the_ranks_below_k(rng):
    keys = torch.randn(1, 1, 200, 8, generator=rng)
    q = torch.randn(1, 1, 2, 8, generator=rng)
    ranked = brute_force_topk(q, keys, 30)
    pred = make("oracle:p=0.5,fill=next,keep=top").build(keys).search(q, 20)
    assert torch.equal(pred.sort(-1).values, torch.cat([ranked[..., :10], ranked[..., 20:30]], -1).sort(-1).values)


def test_oracle_is_seeded(rng):
    keys = torch.randn(1, 2, 200, 8, generator=rng)
    q = torch.randn(1, 2, 3, 8, generator=rng)
    a = make("oracle:p=0.3,seed=5").build(keys).search(q, 10)
    b = make("oracle:p=0.3,seed=5").build(keys).search(q, 10)
    c = make("oracle:p=0.3,seed=6").build(keys).search(q, 10)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_oracle_needs_enough_outside_keys(rng):
    ix = make("oracle:p=0.25").build(torch.randn(1, 1, 30, 8, generator=rng))
    with pytest.raises(ValueError, match="outside the true Top-k"):
        ix.search(torch.randn(1, 1, 1, 8, generator=rng), 20)


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.fixture
def built(rng):
    return make("exact").build(torch.randn(2, 3, 50, 16, generator=rng))


@pytest.mark.parametrize("k", [0, -1, 51])
def test_k_out_of_range(built, rng, k):
    with pytest.raises(ValueError, match=r"k must be in \[1, N\] = \[1, 50\]"):
        built.search(torch.randn(2, 3, 1, 16, generator=rng), k)


def test_k_must_be_int(built, rng):
    with pytest.raises(TypeError):
        built.search(torch.randn(2, 3, 1, 16, generator=rng), 2.5)


def test_head_count_mismatch(built, rng):
    with pytest.raises(ValueError, match="leading .*GQA"):
        built.search(torch.randn(2, 9, 1, 16, generator=rng), 4)


def test_dim_mismatch(built, rng):
    with pytest.raises(ValueError, match="dim 8"):
        built.search(torch.randn(2, 3, 1, 8, generator=rng), 4)


def test_nan_and_inf_rejected(rng):
    keys = torch.randn(1, 1, 20, 4, generator=rng)
    keys[0, 0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        make("exact").build(keys)
    ix = make("exact").build(torch.randn(1, 1, 20, 4, generator=rng))
    with pytest.raises(ValueError, match="NaN/Inf"):
        ix.search(torch.full((1, 1, 1, 4), float("inf")), 3)


def test_empty_cache_and_unbuilt_index(rng):
    with pytest.raises(ValueError, match="empty cache"):
        make("exact").build(torch.empty(1, 1, 0, 4))
    with pytest.raises(RuntimeError, match="build"):
        make("exact").search(torch.randn(1, 1, 1, 4, generator=rng), 1)


def test_integer_keys_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        make("exact").build(torch.ones(1, 4, 4, dtype=torch.int32))


def test_cost_is_reported(built, rng):
    built.search(torch.randn(2, 3, 4, 16, generator=rng), 5)
    assert built.cost.keys_scored == 50 and built.cost.bytes_read == 50 * 16 * 4
    assert built.cost.search_seconds > 0
