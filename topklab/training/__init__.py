"""Training: learned indexers distilled from a frozen model (``indexer_distill``), and the Top-k fine-tuning of the
model itself (``topk_sft``)."""

from topklab.training.indexer_distill import attention_target, distill, distillation_kl, evaluate_kl

__all__ = ["attention_target", "distill", "distillation_kl", "evaluate_kl"]
