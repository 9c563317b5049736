"""Quantize one linear-like module into a `QuantLinear`.

Hugging Face models use two linear layouts: `nn.Linear` (weight stored (out, in)) and GPT-2 style
`Conv1D` (weight stored (in, out)). Everything in `layerwise.quant` works on the (out, in) view that
`layerwise.models.linear_weight` gives.
"""

from __future__ import annotations

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.models import LINEAR_TYPES, linear_weight
from layerwise.quant.qlinear import QuantLinear
from layerwise.quant.registry import QUANTIZERS
from layerwise.types import QuantSpec


def quantize_module(module: nn.Module, spec: QuantSpec, hessian: torch.Tensor | None = None) -> QuantLinear:
    """A `QuantLinear` computing the same function as `module`, up to quantization error.

    The method is looked up by ``spec.method`` in `QUANTIZERS`; `hessian` is passed through to it. The
    bias, if any, is copied unquantized in its original dtype.
    """
    if not isinstance(module, LINEAR_TYPES):
        raise LayerwiseError(
            f"cannot quantize a {type(module).__name__}; only nn.Linear and transformers Conv1D are supported"
        )
    weight = linear_weight(module).detach()
    quantizer = QUANTIZERS.get(spec.method)
    qw = quantizer(weight, spec, hessian)
    if (qw.out_features, qw.in_features) != tuple(weight.shape):
        raise LayerwiseError(
            f"quantizer {spec.method!r} returned a {qw.out_features}x{qw.in_features} weight for a "
            f"{weight.shape[0]}x{weight.shape[1]} module"
        )
    bias = getattr(module, "bias", None)
    return QuantLinear.from_quantized(qw, None if bias is None else bias.detach())


def relative_error(before: torch.Tensor | nn.Module, qlinear: QuantLinear) -> float:
    """``||W - deq(W)||_F / ||W||_F``: how much of the weight quantization lost (0 for a zero weight).

    `before` is the original module or its (out, in) weight.
    """
    weight = before if isinstance(before, torch.Tensor) else linear_weight(before).detach()
    weight = weight.detach().to(torch.float32)
    if tuple(weight.shape) != (qlinear.out_features, qlinear.in_features):
        raise LayerwiseError(
            f"weight of shape {tuple(weight.shape)} does not match the {qlinear.out_features}x"
            f"{qlinear.in_features} quantized module"
        )
    norm = torch.linalg.matrix_norm(weight)
    if norm == 0:
        return 0.0
    diff = weight - qlinear.dequantize(torch.float32).to(weight.device)
    return float(torch.linalg.matrix_norm(diff) / norm)
