"""Training of learned indexers (the model itself stays frozen)."""

from topklab.training.indexer_distill import attention_target, distill, distillation_kl, evaluate_kl

__all__ = ["attention_target", "distill", "distillation_kl", "evaluate_kl"]
