"""The quantizer registry: ``spec.method`` -> the function that quantizes one weight matrix."""

from __future__ import annotations

from typing import Protocol

import torch

from layerwise.quant.quantized import QuantizedWeight
from layerwise.registry import Registry
from layerwise.types import QuantSpec


class Quantizer(Protocol):
    """Every quantization method has this signature.

    `weight` is (out_features, in_features) float; `hessian` is the (in_features, in_features) input
    second-moment matrix for methods that use calibration data (GPTQ) and is ignored by those that do not.
    """

    def __call__(
        self, weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None
    ) -> QuantizedWeight: ...


QUANTIZERS: Registry[Quantizer] = Registry("quantization method")
