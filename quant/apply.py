"""Quantize one linear-like module into a `QuantLinear`.

Hugging Face models use two linear layouts: `nn.Linear` (weight stored (out, in)) and GPT-2 style
`Conv1D` (weight stored (in, out)). Everything in `layerwise.quant` works on the (out, in) view that
`layerwise.model.adapter.linear_weight` gives.
"""

from __future__ import annotations

import torch
from torch import nn

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.model.adapter import LINEAR_TYPES, linear_weight
from layerwise.quant.hessian import AsymmetricHessian
from layerwise.quant.qlinear import QuantLinear
from layerwise.quant.quantized import QuantizedWeight
from layerwise.quant.registry import QUANTIZERS


def _check_linear(module: nn.Module) -> torch.Tensor:
    if not isinstance(module, LINEAR_TYPES):
        raise LayerwiseError(
            f"cannot quantize a {type(module).__name__}; only nn.Linear and transformers Conv1D are supported"
        )
    return linear_weight(module).detach()


def _wrap(module: nn.Module, weight: torch.Tensor, qw: QuantizedWeight, method: str) -> QuantLinear:
    if (qw.out_features, qw.in_features) != tuple(weight.shape):
        raise LayerwiseError(
            f"quantizer {method!r} returned a {qw.out_features}x{qw.in_features} weight for a "
            f"{weight.shape[0]}x{weight.shape[1]} module"
        )
    bias = getattr(module, "bias", None)
    return QuantLinear.from_quantized(qw, None if bias is None else bias.detach())


def quantize_module(module: nn.Module, spec: QuantSpec,
                    hessian: torch.Tensor | AsymmetricHessian | None = None) -> QuantLinear:
    """A `QuantLinear` computing the same function as `module`, up to quantization error.

    The method is looked up by ``spec.method`` in `QUANTIZERS`; `hessian` is passed through to it. The
    group size is the one that fits the module's input width (`QuantSpec.fit`), which is what the
    returned module's spec says. The bias, if any, is copied unquantized in its original dtype.
    """
    weight = _check_linear(module)
    spec = spec.fit(weight.shape[1])
    return _wrap(module, weight, QUANTIZERS.get(spec.method)().quantize(weight, spec, hessian), spec.method)


def quantize_modules(
    jobs: list[tuple[nn.Module, QuantSpec, torch.Tensor | AsymmetricHessian | None]],
) -> list[QuantLinear]:
    """`quantize_module` for each (module, spec, hessian) job, sharing work between jobs where it can.

    Jobs whose method can quantize several weights in one pass (its quantizer's `shares_hessian`, GPTQ)
    and that use the same Hessian object run together: on a llama layer that is one
    sweep for q/k/v and one for gate/up, and in the sensitivity scorer one sweep for all candidate
    options of those modules. Specs are fitted to each module's width first (`QuantSpec.fit`), and jobs
    that then coincide (options 3:128 and 3:256 both become group 64 on a 576-wide module) are quantized
    once and share the result.
    """
    jobs = [(module, spec.fit(_check_linear(module).shape[1]), hessian) for module, spec, hessian in jobs]
    results: list[QuantLinear | None] = [None] * len(jobs)
    batches: dict[tuple[str, int, bool], list[int]] = {}
    first: dict[tuple[int, QuantSpec, int], int] = {}
    repeats: dict[int, int] = {}
    for index, (module, spec, hessian) in enumerate(jobs):
        key = (id(module), spec, id(hessian))
        if key in first:
            repeats[index] = first[key]
            continue
        first[key] = index
        if not QUANTIZERS.get(spec.method).shares_hessian or hessian is None:
            results[index] = quantize_module(module, spec, hessian)
        else:
            # GGUF types and integer grids sweep apart: their groups are fixed differently.
            batches.setdefault((spec.method, id(hessian), spec.gguf is not None), []).append(index)
    for (method, _, _), indices in batches.items():
        weights = [_check_linear(jobs[i][0]) for i in indices]
        hessian = jobs[indices[0]][2]
        quantized = QUANTIZERS.get(method)().quantize_shared(weights, [jobs[i][1] for i in indices], hessian)
        for i, weight, qw in zip(indices, weights, quantized, strict=True):
            results[i] = _wrap(jobs[i][0], weight, qw, method)
    for index, original in repeats.items():
        results[index] = results[original]
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


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
    diff = qlinear.dequantize(torch.float32).to(weight.device)
    torch.sub(weight, diff, out=diff)  # weight - deq(W), written over deq(W): one weight-sized temporary
    return float(torch.linalg.matrix_norm(diff) / norm)


def squared_norm(weight: torch.Tensor) -> float:
    """``||W||_F^2`` summed in float64 (one float64 copy of the weight, squared in place)."""
    return float(weight.detach().to(torch.float64, copy=True).pow_(2).sum())
