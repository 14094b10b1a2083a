"""Fidelity metrics (recall@k, attention-mass recall, KL, output error) and attention traces."""

from topklab.fidelity.metrics import (
    attention_logits,
    attention_mass_recall,
    fidelity,
    fidelity_from_logits,
    kl_divergence,
    output_error,
    recall_at_k,
    selection_mask,
)

__all__ = [
    "attention_logits", "attention_mass_recall", "fidelity", "fidelity_from_logits", "kl_divergence", "output_error", "recall_at_k",
    "selection_mask",
]
