"""Adapters that plug topklab into Hugging Face transformers models (the only framework-specific code):
Top-k decoding with any indexer, and trace capture."""

from topklab.decoding.capture import capture
from topklab.decoding.topk_attention import TopkAttention, enable_topk_attention, topk_attention

__all__ = ["TopkAttention", "capture", "enable_topk_attention", "topk_attention"]
