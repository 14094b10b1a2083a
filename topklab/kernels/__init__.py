"""Triton kernels for Top-k decoding, each beside the plain torch reference it is tested against.

On CUDA tensors the public functions run the Triton kernel; elsewhere (CPU, or no triton) the torch reference.
"""

from topklab.kernels.fp8_index import (
    dequantize_fp8,
    fp8_index_scores,
    fp8_index_scores_reference,
    hadamard_rotate,
    quantize_fp8,
)

__all__ = [
    "dequantize_fp8", "fp8_index_scores", "fp8_index_scores_reference", "hadamard_rotate", "quantize_fp8",
]
