"""Dequantization kernels: `torch_ref` is the portable reference path every faster kernel must match."""

from layerwise.kernels.torch_ref import dequant_matmul, dequantize

__all__ = ["dequant_matmul", "dequantize"]
