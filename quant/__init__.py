"""Quantization: packed formats, quantizers (registered in `QUANTIZERS`), and the `QuantLinear` module.

Importing this package registers every built-in quantizer; a new method is one module with a
``@QUANTIZERS.register(name)`` `Quantizer` subclass plus one import line below.
"""

from layerwise.core.bitstream import PackFormat, pack, unpack
from layerwise.quant import bnb  # noqa: F401  (registers nf4 and int8)
from layerwise.quant.apply import (
    empty_quantized,
    linear_weight,
    quantize_module,
    quantize_modules,
    relative_error,
    squared_norm,
    stored_tensors,
)
from layerwise.quant.gptaq import GptaqQuantizer, quantize_gptaq, quantize_gptaq_shared
from layerwise.quant.gptq import (
    GptqQuantizer,
    HessianFactor,
    min_calibration_tokens,
    quantize_gptq,
    quantize_gptq_shared,
)
from layerwise.quant.grid import GRID_SEARCHES, grid_params, group_error, grouped_params, mse_group_params
from layerwise.quant.hessian import (
    AsymmetricHessian,
    CrossTermAccumulator,
    HessianAccumulator,
    SharedInputHessians,
)
from layerwise.quant.qlinear import QuantLinear, dense_weights
from layerwise.quant.quantized import QuantizedWeight
from layerwise.quant.registry import QUANTIZERS, Quantizer
from layerwise.quant.rtn import RtnQuantizer, group_params, quantize_codes, quantize_rtn

__all__ = [
    "GRID_SEARCHES",
    "QUANTIZERS",
    "AsymmetricHessian",
    "CrossTermAccumulator",
    "GptaqQuantizer",
    "GptqQuantizer",
    "HessianAccumulator",
    "HessianFactor",
    "PackFormat",
    "QuantLinear",
    "QuantizedWeight",
    "Quantizer",
    "RtnQuantizer",
    "SharedInputHessians",
    "dense_weights",
    "empty_quantized",
    "grid_params",
    "group_error",
    "group_params",
    "grouped_params",
    "linear_weight",
    "min_calibration_tokens",
    "mse_group_params",
    "pack",
    "quantize_codes",
    "quantize_gptaq",
    "quantize_gptaq_shared",
    "quantize_gptq",
    "quantize_gptq_shared",
    "quantize_module",
    "quantize_modules",
    "quantize_rtn",
    "relative_error",
    "squared_norm",
    "stored_tensors",
    "unpack",
]
