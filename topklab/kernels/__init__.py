"""Triton kernels for Top-k decoding, each beside the plain torch reference it is tested against.

On CUDA tensors the public functions run the Triton kernel; elsewhere (CPU, or no triton) the torch reference.
``topklab.kernels._triton.run_on_interpreter`` runs the kernels on CPU tensors through Triton's interpreter.
"""

from topklab.kernels.fp8_index import (
    dequantize_fp8,
    fp8_index_scores,
    fp8_index_scores_reference,
    hadamard_rotate,
    quantize_fp8,
)
from topklab.kernels.sparse_attention import (
    sparse_decode_attention,
    sparse_decode_attention_reference,
    topk_attention,
    topk_attention_reference,
)
from topklab.kernels.topk import topk, topk_reference

__all__ = [
    "dequantize_fp8", "fp8_index_scores", "fp8_index_scores_reference", "hadamard_rotate", "quantize_fp8",
    "sparse_decode_attention", "sparse_decode_attention_reference", "topk_attention", "topk_attention_reference",
    "topk", "topk_reference",
]
