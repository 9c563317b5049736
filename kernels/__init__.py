"""Dequantization kernels: `torch_ref` is the portable reference path every faster kernel must match.

`triton_matmul` holds the fused Triton dequantize-and-multiply for ``bitstream-v1`` weights (2/3/4/8
bits; a split-K GEMV for M <= 16 rows, a tiled GEMM above, sharing the tile code in `triton_tiles`).
`BitstreamCodec.matmul` runs it for CUDA tensors when Triton imports, and the torch reference otherwise;
``LAYERWISE_KERNEL=auto|triton|torch`` overrides that choice. Triton itself is imported only when a
kernel runs, so this package imports without it.
"""

from layerwise.kernels.torch_ref import dequant_matmul, dequantize
from layerwise.kernels.triton_matmul import KERNEL_ENV, triton_available, triton_dequant_matmul, use_triton

__all__ = ["KERNEL_ENV", "dequant_matmul", "dequantize", "triton_available", "triton_dequant_matmul", "use_triton"]
