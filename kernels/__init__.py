"""Dequantization kernels: `torch_ref` is the portable reference path every faster kernel must match.

`triton_matmul` holds the fused Triton dequantize-and-multiply for ``bitstream-v1`` weights (2/3/4/8
bits; a split-K GEMV for M <= 16 rows, a tiled GEMM above, sharing the tile code in `triton_tiles`).
`BitstreamCodec.matmul` runs it for CUDA tensors when Triton imports, and the torch reference otherwise;
``LAYERWISE_KERNEL=auto|triton|torch`` overrides that choice. Triton itself is imported only when a
kernel runs, so this package imports without it.

This folder is installed as ``layerwise.kernels``. Python started in the repository root (or with it on
``sys.path``) can also import it as a top-level ``kernels``, the name of the Hugging Face hub package that
transformers probes for (`is_kernels_available`: ``find_spec``, then package metadata, then, as a last
resort, an import that it does not guard against ImportError). Imported under any other name, this module
therefore makes itself look like what transformers treats as "not installed": a namespace-like module
with no ``__file__``, no ``__version__``, no submodules and no names, importing nothing.
``from kernels import get_kernel`` then fails with ImportError, as it does without the hub package.
"""

if __name__ != "layerwise.kernels":
    __path__: list[str] = []  # no submodules: `import kernels.torch_ref` fails instead of loading a second copy
    del globals()["__file__"]
else:
    from layerwise.kernels.torch_ref import dequant_matmul, dequantize
    from layerwise.kernels.triton_matmul import KERNEL_ENV, triton_available, triton_dequant_matmul, use_triton

    __all__ = ["KERNEL_ENV", "dequant_matmul", "dequantize", "triton_available", "triton_dequant_matmul",
               "use_triton"]
