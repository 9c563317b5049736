"""GPTAQ (Li et al., 2025): GPTQ calibrated asymmetrically, towards the full-precision model's outputs.

GPTQ calibrates each linear on the inputs X that the already-quantized layers before it produce and
minimises ``||W X - Q X||``. GPTAQ minimises ``||W X_fp - Q X||`` instead, X_fp being the inputs the
full-precision model gives the same linear, so that a layer also cancels part of the error its inputs
arrive with. (Here the columns of X are tokens: X is (in_features, tokens).)

Math. With ``dX = X_fp - X``, ``H = (2/n) X X^T`` and the cross term ``C = (2/n) dX X^T``
(`layerwise.quant.hessian`), one output row's loss is ``||w X_fp - q X||^2 = ||(w - q) X + w dX||^2``.
GPTQ quantizes the columns one at a time and moves the columns not yet quantized to absorb each rounding
error. GPTAQ adds a second move: once column j is fixed, the part of the asymmetry it carries, ``w_j dX_j``
(dX_j the j-th row of dX), can only be cancelled by the columns F after it, and their least-squares
move is ``w_j C[j, F] H_F^-1``. With U the upper Cholesky factor of ``H^-1`` (GPTQ's, for which
``U_F^T U_F = H_F^-1`` on every trailing block F), that move is row j of ``P = triu(C U^T, 1) U``: the
whole sequence of moves comes from one (K, K) product made once per input, and the sweep adds
``w_j P[j, k]`` to each later column k beside GPTQ's ``-e_j U[j, k]``, lazily per block like GPTQ's
(`layerwise.quant.gptq._quantize_columns`). P is scaled by `alpha`, 0.25 by default as in the authors'
code (github.com/Intelligent-Computing-Lab-Yale/GPTAQ); alpha = 0 is GPTQ.

w_j is column j as the sweep holds it just before rounding, in the block and in the lazy update of the
columns after the block alike, so the block size changes nothing beyond float rounding. (The authors'
code multiplies the block's already-rounded columns in its lazy update, which makes its result depend on
the block size.)

Everything else is GPTQ's, reused rather than repeated: the Hessian's factorisation and damping (raised
on failure), act-order with static groups, dead inputs, blocks, packing. A zero cross term (X_fp = X, the
first layer of a model, or a layer quantized alone on full-precision inputs) gives P = 0 exactly, and
adding exact zeros changes no float, so GPTAQ then writes GPTQ's codes bit for bit.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch

from layerwise.core.bitstream import PackFormat
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.quant.gptq import HessianFactor, _check_inputs, _permuted, quantize_gptq_shared, sweep_factored
from layerwise.quant.hessian import AsymmetricHessian
from layerwise.quant.quantized import QuantizedWeight, all_finite
from layerwise.quant.registry import QUANTIZERS, Quantizer

DEFAULT_ALPHA = 0.25  # the authors' default (fasterquant's alpha in their gptaq_utils.py)


def asymmetry_matrix(cross: torch.Tensor, upper: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * triu(C U^T, 1) U``: row j holds the move of the columns after j once column j is fixed.

    `cross` (C) and `upper` (U) are in processing order. The result is strictly upper triangular.
    """
    product = cross @ upper.T
    product.triu_(1)
    out = product @ upper
    del product
    return out.mul_(alpha)


def _check_cross(cross: torch.Tensor, in_features: int, alpha: float) -> None:
    if tuple(cross.shape) != (in_features, in_features):
        raise LayerwiseError(f"the cross term has shape {tuple(cross.shape)} but the weight has {in_features} "
                             f"inputs; it must be ({in_features}, {in_features})")
    if not all_finite(cross):
        raise LayerwiseError("the cross term contains NaN or inf values: the calibration activations overflowed; "
                             "calibrate in float32 or with shorter / fewer outlier sequences")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise LayerwiseError(f"GPTAQ's alpha must be a finite non-negative factor, got {alpha}")


def quantize_gptaq_shared(
    weights: list[torch.Tensor],
    specs: list[QuantSpec],
    hessian: torch.Tensor | None,
    cross: torch.Tensor | None,
    *,
    alpha: float = DEFAULT_ALPHA,
    damp: float = 0.01,
    block_size: int = 32,
    act_order: bool = True,
) -> list[QuantizedWeight]:
    """GPTAQ-quantize several weights that read the same input, in one column sweep.

    `hessian` is the quantized stream's ``(2/n) X X^T`` and `cross` the cross term ``(2/n) (X_fp - X) X^T``
    (`CrossTermAccumulator`), on the same scale. None for `cross` means the inputs are the full-precision
    model's own: that is GPTQ. `damp`, `block_size`, `act_order` and the specs as in `quantize_gptq_shared`.
    """
    if hessian is None:
        raise LayerwiseError("GPTAQ needs calibration inputs: pass the linear's input Hessian and cross term "
                             "(the engine collects both), or use method 'rtn', which needs none")
    if cross is None:
        return quantize_gptq_shared(weights, specs, hessian, damp=damp, block_size=block_size, act_order=act_order)
    if not weights or len(weights) != len(specs):
        raise LayerwiseError(f"need one spec per weight, got {len(weights)} weights and {len(specs)} specs")
    for weight in weights:
        _check_inputs(weight, hessian, damp, block_size)
    _check_cross(cross, hessian.shape[0], alpha)
    factor = HessianFactor.of(hessian, damp=damp, act_order=act_order)
    permuted = _permuted(cross.detach(), factor.perm)
    permuted[:, factor.dead[factor.perm]] = 0.0  # dead inputs' weights are zero and stay zero
    return sweep_factored(weights, specs, factor, block_size,
                          functools.partial(asymmetry_matrix, permuted, alpha=alpha))


def quantize_gptaq(
    weight: torch.Tensor,
    spec: QuantSpec,
    hessian: torch.Tensor | None,
    cross: torch.Tensor | None,
    **options: float | int | bool,
) -> QuantizedWeight:
    """GPTAQ-quantize one (out_features, in_features) weight; options as in `quantize_gptaq_shared`."""
    return quantize_gptaq_shared([weight], [spec], hessian, cross, **options)[0]  # type: ignore[arg-type]


@QUANTIZERS.register("gptaq")
class GptaqQuantizer(Quantizer):
    """GPTAQ with the default alpha, damping, block size and act-order (`quantize_gptaq_shared`).

    Reads an `AsymmetricHessian` (the engine carries the full-precision stream beside the quantized one to
    collect it: `needs_reference_inputs`). A plain Hessian means the inputs are the full-precision model's
    own, as in the sensitivity scorer, which quantizes each layer alone on them: there GPTAQ is GPTQ.
    Stores the same bitstream format as RTN and GPTQ.
    """

    name: ClassVar[str] = "gptaq"
    needs_hessian: ClassVar[bool] = True
    needs_reference_inputs: ClassVar[bool] = True
    storage: ClassVar[str] = PackFormat.BITSTREAM.value
    shares_hessian: ClassVar[bool] = True

    def quantize(self, weight: torch.Tensor, spec: QuantSpec,
                 hessian: torch.Tensor | AsymmetricHessian | None = None) -> QuantizedWeight:
        return self.quantize_shared([weight], [spec], hessian)[0]

    def quantize_shared(
        self, weights: list[torch.Tensor], specs: list[QuantSpec], hessian: torch.Tensor | AsymmetricHessian | None
    ) -> list[QuantizedWeight]:
        if isinstance(hessian, AsymmetricHessian):
            return quantize_gptaq_shared(weights, specs, hessian.hessian, hessian.cross)
        return quantize_gptaq_shared(weights, specs, hessian, None)
