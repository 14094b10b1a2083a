"""How faithfully a selection reproduces exact Top-k attention, per query.

Notation: one query q, keys K (N x d), values V, scale s, dense attention p_i = softmax_i(s q.k_i), a selected set
S (the indexer's k indices; -1 entries mean "no key" and duplicates count once) and the exact Top-k set T.

- recall@k            |S ∩ T| / |T|                       (the study's retrieval precision p when |S| = |T| = k)
- attention-mass recall  m = sum_{i in S} p_i              (the share of dense attention mass that is kept)
- output error        ||o_S - o|| / ||o||,  o = sum_i p_i v_i,  o_S = sum_{i in S} (p_i / m) v_i
- KL(p_S || p)        = sum_{i in S} (p_i/m) log((p_i/m) / p_i) = -log m
  (attention renormalised over S against dense attention; KL(p || p_S) is infinite whenever m < 1.)

All functions take ``q [*, M, d]``, ``keys``/``values`` ``[*, N, d]`` with matching leading dims (fold GQA groups
into M) and ``pred``/``true`` ``[*, M, k]``, and return float32 ``[*, M]``. They run on whatever device the inputs
are on; scores are computed in float32.
"""

from __future__ import annotations

import math

import torch

from topklab.checks import check_indices, check_pair, check_vectors


def recall_at_k(pred: torch.Tensor, true: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """|pred ∩ true| / k with k = true.shape[-1]; -1 entries of pred never match, duplicates count once.

    With ``logits [*, M, N]`` the exact Top-k is that of the logits (``true`` gives only k) and ties count as they
    should: a selected key scoring exactly the k-th score is as good as the tied key a Top-k happened to keep, so
    recall is the overlap with the best of the equally exact Top-k sets, |pred ∩ above| + min(|pred ∩ tied|,
    k - |above|). A ``true`` from another precision or kernel then cannot count a near-tie swap as a miss either.
    Masked keys (-inf logits) are never hits; where fewer than k keys are valid, recall is over those.
    """
    check_indices(pred, "pred")
    check_indices(true, "true")
    if pred.shape[:-1] != true.shape[:-1]:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} must share all but the last dim")
    k = true.shape[-1]
    if k == 0:
        raise ValueError("true must hold at least one index (k >= 1)")
    if logits is not None:
        return _tie_aware_recall(pred, k, logits)
    true_sorted = true.long().sort(dim=-1).values
    pred_sorted = pred.long().sort(dim=-1).values
    pos = torch.searchsorted(true_sorted, pred_sorted).clamp_max(k - 1)
    hit = (true_sorted.gather(-1, pos) == pred_sorted) & (pred_sorted >= 0)
    first = torch.ones_like(hit)
    first[..., 1:] = pred_sorted[..., 1:] != pred_sorted[..., :-1]
    return (hit & first).sum(-1).float() / k


def _tie_aware_recall(pred: torch.Tensor, k: int, logits: torch.Tensor) -> torch.Tensor:
    if k > logits.shape[-1]:
        raise ValueError(f"k = {k} exceeds the {logits.shape[-1]} keys the logits score")
    valid = torch.isfinite(logits)  # masked-out keys (-inf) never count, above the cut or tied
    logits = logits.masked_fill(~valid, -math.inf)
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    above, tied = valid & (logits > kth), valid & (logits == kth)
    slots = valid.sum(-1).clamp(max=k)  # fewer valid keys than k: the exact Top-k is all of them
    n_above = above.sum(-1)
    selected = _mask_for(pred, logits)
    hits = (selected & above).sum(-1) + torch.minimum((selected & tied).sum(-1), slots - n_above)
    return hits.float() / slots.clamp(min=1)


MASS_FLOOR = 1e-30  # KL = -log(mass) is capped at -log(MASS_FLOOR) ~ 69.1 when nothing (or no mass) is selected


def selection_mask(pred: torch.Tensor, n: int, lead: torch.Size | None = None) -> torch.Tensor:
    """Boolean ``[*, M, n]`` mask of the selected keys (ignoring -1 entries); ``lead``, if given, is the ``[*, M]``
    that pred must match exactly (a broadcast would apply one query's selection to others)."""
    check_indices(pred, "pred", lead)
    pred = pred.long()
    if pred.numel() and int(pred.max()) >= n:
        raise ValueError(f"pred holds index {int(pred.max())} but there are only N = {n} keys")
    if pred.numel() and int(pred.min()) < -1:
        raise ValueError(f"pred holds index {int(pred.min())}; valid indices are 0..N-1, or -1 for 'no key'")
    slots = torch.where(pred < 0, torch.full_like(pred, n), pred)
    mask = torch.zeros(*pred.shape[:-1], n + 1, dtype=torch.bool, device=pred.device)
    return mask.scatter_(-1, slots, True)[..., :n]


def attention_logits(q: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``s q.K^T`` in float32, ``[*, M, N]``; scale defaults to d^-1/2."""
    check_vectors(q, "q")
    check_vectors(keys, "keys")
    check_pair(q, keys, "q", "keys")
    if keys.shape[-2] == 0:
        raise ValueError("keys are empty (N = 0): there is no attention to measure")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale


def attention_mass_recall(q, keys, pred, scale: float | None = None) -> torch.Tensor:
    """Share of the dense softmax mass on the selected keys."""
    logits = attention_logits(q, keys, scale)
    return _mass(torch.softmax(logits, dim=-1), _mask_for(pred, logits))


def kl_divergence(q, keys, pred, scale: float | None = None) -> torch.Tensor:
    """KL(attention renormalised over pred || dense attention), computed from the two distributions."""
    logits = attention_logits(q, keys, scale)
    mask = _mask_for(pred, logits)
    log_dense = torch.log_softmax(logits, dim=-1)
    log_sparse = torch.log_softmax(logits.masked_fill(~mask, -math.inf), dim=-1)
    terms = torch.where(mask, log_sparse.exp() * (log_sparse - log_dense), torch.zeros_like(logits))
    return torch.where(mask.any(-1), terms.sum(-1), -math.log(MASS_FLOOR))  # nothing selected: no renormalised p_S


def output_error(q, keys, values, pred, scale: float | None = None) -> torch.Tensor:
    """Relative L2 error of attention renormalised over pred against dense attention."""
    check_vectors(values, "values")
    if values.shape[:-1] != keys.shape[:-1]:
        raise ValueError(f"values {tuple(values.shape)} must match keys {tuple(keys.shape)} in all but the last dim")
    logits = attention_logits(q, keys, scale)
    return _output_error(logits, _mask_for(pred, logits), values.float())


def fidelity(q, keys, values, pred, true=None, scale: float | None = None) -> dict[str, torch.Tensor]:
    """All metrics at once, sharing one softmax: recall@k (if ``true`` is given), mass recall, KL, output error."""
    check_vectors(values, "values")
    return fidelity_from_logits(attention_logits(q, keys, scale), values, pred, true)


def fidelity_from_logits(logits: torch.Tensor, values: torch.Tensor, pred: torch.Tensor,
                         true: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`fidelity` from precomputed ``logits [*, M, N]`` (scaled q.k), for callers that score many selections."""
    if values.shape[-2] != logits.shape[-1]:
        raise ValueError(f"values hold {values.shape[-2]} keys but the logits score {logits.shape[-1]}")
    mask = _mask_for(pred, logits)
    mass = _mass(torch.softmax(logits, dim=-1), mask)
    out = {
        "mass_recall": mass,
        "kl": -torch.log(mass.clamp_min(MASS_FLOOR)),
        "output_error": _output_error(logits, mask, values.float()),
    }
    if true is not None:
        out["recall"] = recall_at_k(pred, true, logits)
    return out


def _mask_for(pred: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return selection_mask(pred, logits.shape[-1], lead=logits.shape[:-1])


def _mass(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (probs * mask).sum(-1)


def _output_error(logits: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    dense = torch.matmul(torch.softmax(logits, dim=-1), values)
    sparse = torch.matmul(torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1).nan_to_num(0.0), values)
    return (sparse - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-30)
