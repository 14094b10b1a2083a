import math

import pytest
import torch

from topklab.fidelity import (
    attention_mass_recall,
    fidelity,
    kl_divergence,
    output_error,
    recall_at_k,
    selection_mask,
)


def test_recall_hand_computed():
    true = torch.tensor([[0, 1, 2, 3]])
    assert recall_at_k(torch.tensor([[3, 2, 9, 8]]), true).item() == 0.5
    assert recall_at_k(torch.tensor([[3, 3, 3, 3]]), true).item() == 0.25  # duplicates count once
    assert recall_at_k(torch.tensor([[-1, -1, 0, 7]]), true).item() == 0.25  # -1 = no key
    assert recall_at_k(torch.tensor([[1, 0, 3, 2]]), true).item() == 1.0


def test_recall_matches_python_sets(rng):
    true = torch.stack([torch.randperm(50, generator=rng)[:10] for _ in range(30)])
    pred = torch.randint(-1, 50, (30, 10), generator=rng)
    want = torch.tensor([len(set(p.tolist()) & set(t.tolist())) / 10 for p, t in zip(pred, true)])
    assert torch.equal(recall_at_k(pred, true), want)


def test_selection_mask_and_bad_indices():
    mask = selection_mask(torch.tensor([[2, -1, 2, 0]]), 4)
    assert mask.tolist() == [[True, False, True, False]]
    with pytest.raises(ValueError, match="only N = 4"):
        selection_mask(torch.tensor([[4]]), 4)
    with pytest.raises(ValueError, match="-1 for 'no key'"):
        selection_mask(torch.tensor([[-2]]), 4)
    with pytest.raises(TypeError):
        recall_at_k(torch.tensor([[0.0]]), torch.tensor([[0]]))


def test_recall_with_logits_counts_tied_keys_once_per_free_slot():
    # scores: keys 0, 1 strictly above the cut; keys 2, 3, 4 tie at the 3rd score; k = 3 keeps one of them
    logits = torch.tensor([[5.0, 4.0, 1.0, 1.0, 1.0, 0.0]])
    true = torch.tensor([[0, 1, 2]])
    cases = {(0, 1, 4): 1.0, (0, 3, 4): 2 / 3, (2, 3, 4): 1 / 3, (1, 4, 5): 2 / 3, (0, 1, -1): 2 / 3}
    for pred, want in cases.items():
        assert recall_at_k(torch.tensor([pred]), true, logits).item() == pytest.approx(want), pred
    assert recall_at_k(torch.tensor([[0, 1, 4]]), true).item() == pytest.approx(2 / 3)  # by index: a tie is a miss
    # the logits define the exact Top-k: a `true` from another kernel that swapped a near-tie changes nothing
    assert recall_at_k(torch.tensor([[0, 1, 4]]), torch.tensor([[0, 1, 3]]), logits).item() == 1.0
    masked = torch.tensor([[5.0, 4.0, -math.inf, -math.inf]])  # k = 3 > the two valid keys: recall over those two
    assert recall_at_k(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 2]]), masked).item() == 1.0
    assert recall_at_k(torch.tensor([[0, 2, 3]]), torch.tensor([[0, 1, 2]]), masked).item() == 0.5


def test_recall_with_logits_equals_index_recall_without_ties_and_brute_force_with_them(rng):
    """Random logits (no ties): both forms agree. Duplicated keys (ties everywhere): the tie-aware recall is the
    best overlap over every exact Top-k set, found by brute force."""
    import itertools

    logits = torch.randn(40, 30, generator=rng)
    true = torch.topk(logits, 7).indices
    pred = torch.randint(-1, 30, (40, 7), generator=rng)
    assert torch.equal(recall_at_k(pred, true, logits), recall_at_k(pred, true))
    tied = torch.randint(0, 4, (25, 9), generator=rng).float()  # few distinct values: many ties
    true = torch.topk(tied, 4).indices
    pred = torch.randint(-1, 9, (25, 4), generator=rng)
    for row in range(25):
        kth = tied[row].topk(4).values[-1]
        exact_sets = [set(c) for c in itertools.combinations(range(9), 4)
                      if sorted(tied[row, list(c)].tolist(), reverse=True) == tied[row].topk(4).values.tolist()]
        assert all(min(tied[row, list(c)]) == kth for c in exact_sets)
        best = max(len(c & set(pred[row].tolist())) for c in exact_sets) / 4
        assert recall_at_k(pred[row:row + 1], true[row:row + 1], tied[row:row + 1]).item() == pytest.approx(best)


def test_metrics_refuse_a_selection_of_other_leading_dims(rng):
    q, keys, values = (torch.randn(2, 4, 8, generator=rng) for _ in range(3))
    pred = torch.randint(0, 4, (1, 1, 3), generator=rng)  # would broadcast one query's selection to all 8
    for call in (lambda: attention_mass_recall(q, keys, pred), lambda: kl_divergence(q, keys, pred),
                 lambda: output_error(q, keys, values, pred), lambda: fidelity(q, keys, values, pred)):
        with pytest.raises(ValueError, match="leading dims"):
            call()


def test_kl_of_an_empty_selection_is_capped_not_zero(rng):
    q, keys, values = (torch.randn(3, 5, 8, generator=rng) for _ in range(3))
    pred = torch.randint(0, 5, (3, 5, 2), generator=rng)
    pred[1] = -1  # an IVF probe or LSH bucket that found nothing
    kl = kl_divergence(q, keys, pred)
    assert torch.allclose(kl, fidelity(q, keys, values, pred)["kl"], atol=1e-4)
    assert torch.allclose(kl[1], torch.full((5,), -math.log(1e-30))) and (kl[0] > 0).all()


def test_mass_recall_hand_computed():
    # logits 0, log 2, log 3, log 4 (scale 1, d = 1): probabilities 1/10, 2/10, 3/10, 4/10
    keys = torch.tensor([[0.0], [math.log(2)], [math.log(3)], [math.log(4)]])
    q = torch.tensor([[1.0]])
    mass = attention_mass_recall(q, keys, torch.tensor([[3, 1]]), scale=1.0)
    assert mass.item() == pytest.approx(0.6, abs=1e-6)
    assert kl_divergence(q, keys, torch.tensor([[3, 1]]), scale=1.0).item() == pytest.approx(-math.log(0.6), abs=1e-6)


def test_output_error_hand_computed():
    keys = torch.tensor([[0.0], [math.log(3)]])  # p = 1/4, 3/4
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[1.0]])
    # dense output (1/4, 3/4); keeping key 1 only gives (0, 1): error |(−1/4, 1/4)| / |(1/4, 3/4)|
    err = output_error(q, keys, values, torch.tensor([[1]]), scale=1.0)
    assert err.item() == pytest.approx(math.sqrt(2) / 4 / (math.sqrt(10) / 4), abs=1e-6)


def brute_force(q, keys, values, pred, scale):
    """Loop over every query: dense softmax, mass on the selected set, renormalised output (float64)."""
    out = {"mass_recall": [], "kl": [], "output_error": []}
    for qi, sel in zip(q.double(), pred):
        p = torch.softmax(keys.double() @ qi * scale, dim=0)
        chosen = sorted(set(sel.tolist()))
        mass = p[chosen].sum()
        sparse = torch.zeros_like(p)
        sparse[chosen] = p[chosen] / mass
        dense_out, sparse_out = p @ values.double(), sparse @ values.double()
        out["mass_recall"].append(mass)
        out["kl"].append(sum(sparse[i] * torch.log(sparse[i] / p[i]) for i in chosen))
        out["output_error"].append((sparse_out - dense_out).norm() / dense_out.norm())
    return {name: torch.stack(vals).float() for name, vals in out.items()}


def test_metrics_match_brute_force(rng):
    keys, values = torch.randn(64, 16, generator=rng), torch.randn(64, 16, generator=rng)
    q = torch.randn(12, 16, generator=rng) * 2
    pred = torch.stack([torch.randperm(64, generator=rng)[:8] for _ in range(12)])
    want = brute_force(q, keys, values, pred, 0.25)
    got = fidelity(q, keys, values, pred, scale=0.25)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl_divergence(q, keys, pred, 0.25), want["kl"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(output_error(q, keys, values, pred, 0.25), want["output_error"], rtol=1e-4, atol=1e-5)


def test_batched_layout_and_full_selection(rng):
    keys, values = torch.randn(2, 3, 40, 8, generator=rng), torch.randn(2, 3, 40, 8, generator=rng)
    q = torch.randn(2, 3, 5, 8, generator=rng)
    everything = torch.arange(40).expand(2, 3, 5, 40)
    f = fidelity(q, keys, values, everything, true=everything)
    assert f["recall"].shape == (2, 3, 5)
    torch.testing.assert_close(f["mass_recall"], torch.ones(2, 3, 5))
    assert f["output_error"].max() < 1e-5 and f["kl"].abs().max() < 1e-5


def test_metric_input_errors(rng):
    keys = torch.randn(1, 10, 4, generator=rng)
    with pytest.raises(ValueError, match="leading"):
        attention_mass_recall(torch.randn(2, 1, 4, generator=rng), keys, torch.zeros(2, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="head dim"):
        attention_mass_recall(torch.randn(1, 1, 5, generator=rng), keys, torch.zeros(1, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        attention_mass_recall(torch.randn(1, 1, 4, generator=rng), keys[:, :0], torch.zeros(1, 1, 1, dtype=torch.long))
    bad = keys.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        attention_mass_recall(torch.randn(1, 1, 4, generator=rng), bad, torch.zeros(1, 1, 1, dtype=torch.long))
