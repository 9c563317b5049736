"""The quantizer registry: ``spec.method`` -> the `Quantizer` class that quantizes one weight matrix.

A quantizer declares what the pipeline needs to know about it as class attributes, read without
running it: whether it needs calibration Hessians (`needs_hessian`, so the driver collects them),
which storage format its result has (`storage`, the codec's format name), whether it can quantize
several weights that read one input in one pass (`shares_hessian`, so `quantize_modules` batches them),
and whether it also reads the full-precision model's inputs to each linear (`needs_reference_inputs`, so
the engine carries the full-precision stream beside the quantized one and hands it an `AsymmetricHessian`).
The maths stays in free functions (`quantize_rtn`, `quantize_gptq`, ...); the classes wrap them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from layerwise.core.registry import Registry
from layerwise.core.types import QuantSpec
from layerwise.quant.hessian import AsymmetricHessian
from layerwise.quant.quantized import QuantizedWeight


class Quantizer(ABC):
    """One quantization method.

    `weight` is (out_features, in_features) float; `hessian` is the (in_features, in_features) input
    second-moment matrix for methods that use calibration data (`needs_hessian`, GPTQ) and is ignored
    by those that do not; methods that declare `needs_reference_inputs` (GPTAQ) get an `AsymmetricHessian`
    from the engine.
    """

    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False  # reads calibration Hessians: the driver collects them first
    needs_reference_inputs: ClassVar[bool] = False  # also reads the full-precision model's inputs (GPTAQ)
    storage: ClassVar[str]  # format of the stored result (`QuantizedWeight.format`, a codec's `format`)
    shares_hessian: ClassVar[bool] = False  # `quantize_shared` does several weights with one Hessian in one pass

    @abstractmethod
    def quantize(self, weight: torch.Tensor, spec: QuantSpec,
                 hessian: torch.Tensor | AsymmetricHessian | None = None) -> QuantizedWeight:
        """Quantize one (out_features, in_features) weight as `spec` says."""

    def quantize_shared(
        self, weights: list[torch.Tensor], specs: list[QuantSpec], hessian: torch.Tensor | AsymmetricHessian | None
    ) -> list[QuantizedWeight]:
        """Quantize weights that read the same input (one Hessian); one at a time unless `shares_hessian`."""
        return [self.quantize(w, s, hessian) for w, s in zip(weights, specs, strict=True)]


QUANTIZERS: Registry[type[Quantizer]] = Registry("quantization method")


def method_needs_hessian(method: str) -> bool:
    """Whether quantizer `method` reads calibration activations (its class's `needs_hessian`)."""
    return QUANTIZERS.get(method).needs_hessian


def needs_hessian(spec: QuantSpec | None) -> bool:
    return spec is not None and method_needs_hessian(spec.method)


def method_needs_reference_inputs(method: str) -> bool:
    """Whether quantizer `method` also reads the full-precision model's inputs (`needs_reference_inputs`)."""
    return QUANTIZERS.get(method).needs_reference_inputs


def needs_reference_inputs(spec: QuantSpec | None) -> bool:
    return spec is not None and method_needs_reference_inputs(spec.method)
