"""Group-wise round-to-nearest (RTN) quantization, plus the per-group helpers GPTQ reuses.

Conventions (shared by every method, since they only pick codes differently):

* Asymmetric, as in the GPTQ reference implementation: the group's range is widened to contain 0,
  ``xmin = min(min(w), 0)``, ``xmax = max(max(w), 0)``, ``scale = (xmax - xmin) / (2**b - 1)``,
  ``zero = round(-xmin / scale)``. Containing 0 makes an exact 0 weight dequantize to exactly 0 and keeps
  the integer zero point inside ``[0, 2**b - 1]``.
* Symmetric, the GPTQ / AutoGPTQ convention: ``scale = 2 * max|w| / (2**b - 1)`` and ``zero = 2**(b-1)``
  (not stored). All ``2**b`` codes are used, giving levels ``(-2**(b-1) .. 2**(b-1) - 1) * scale``; the
  largest positive weight ``(2**b - 1) / 2 * scale`` lands half a step beyond the top level, so it is
  clamped with an error of at most ``scale / 2`` -- no worse than ordinary rounding.
* Codes are ``clamp(round(w / scale) + zero, 0, 2**b - 1)``, rounding half to even (``torch.round``).
* Scales are stored as fp16, and they are rounded to fp16 *before* the codes are chosen. Otherwise the
  codes would be nearest for a scale that is never stored, and dequantizing with the stored scale would
  add a second, avoidable error.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from layerwise.core.bitstream import PackFormat, pack, row_chunks
from layerwise.core.types import QuantSpec
from layerwise.quant.quantized import QuantizedWeight, check_weight
from layerwise.quant.registry import QUANTIZERS, Quantizer

# Range of positive fp16 values a scale is clamped to: the smallest subnormal and the largest finite.
_FP16_MIN_SCALE = 2.0**-24
_FP16_MAX = 65504.0


def _storable_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round float32 scales to the fp16 value that will be stored, never 0 or inf.

    An all-zero group has scale 0; any positive scale reproduces it exactly, so 1 is used. A group so
    small that its scale underflows fp16 gets the smallest subnormal instead of a division by zero.
    """
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp(_FP16_MIN_SCALE, _FP16_MAX).to(torch.float16).to(torch.float32)


def group_params(w_group: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the group(s) spanned by the last dimension of `w_group`.

    Returns two float32 tensors of shape ``w_group.shape[:-1]`` (no keepdim: a GPTQ caller applies them
    to one column at a time). The scale is already rounded to fp16; the zero is an integer value, fixed at
    ``2**(bits-1)`` when `sym`.
    """
    w = w_group.to(torch.float32)
    maxq = 2**bits - 1
    if sym:
        scale = _storable_scale(w.abs().amax(dim=-1) * 2 / maxq)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    scale = _storable_scale((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes ``clamp(round(w / scale) + zero, 0, 2**bits - 1)`` as int32.

    `scale` and `zero` must broadcast against `w` (add a trailing dimension for a whole group).
    """
    q = torch.round(w.to(torch.float32) / scale) + zero
    return q.clamp(0, 2**bits - 1).to(torch.int32)


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """Round every weight to the nearest point of its group's grid; `hessian` is accepted and ignored.

    The weight is (out_features, in_features); groups run along in_features.
    """
    del hessian  # RTN uses no calibration data; the argument keeps the common quantizer signature
    check_weight(weight, "RTN")
    out_features, in_features = weight.shape
    n_groups = spec.n_groups(in_features)
    width = spec.group_size if n_groups > 1 else in_features
    weight = weight.detach()
    scale = torch.empty(out_features, n_groups, dtype=torch.float32, device=weight.device)
    zero = torch.empty_like(scale)
    codes = torch.empty(out_features, in_features, dtype=torch.int32, device=weight.device)
    # Rows are independent: quantized a few at a time, so the temporaries stay small (same values).
    for rows in row_chunks(out_features, n_groups * width):
        m = rows.stop - rows.start
        # Zero padding is harmless: every group's range already contains 0, so padded columns change
        # neither min/max nor max|w|; their codes are cut off again below.
        w = F.pad(weight[rows].to(torch.float32), (0, n_groups * width - in_features)).view(m, n_groups, width)
        scale[rows], zero[rows] = group_params(w, spec.bits, spec.sym)
        chunk = quantize_codes(w, scale[rows, :, None], zero[rows, :, None], spec.bits)
        codes[rows] = chunk.view(m, n_groups * width)[:, :in_features]
    return QuantizedWeight(
        qweight=pack(codes, spec.bits),
        scales=scale.to(torch.float16),
        zeros=None if spec.sym else zero.to(torch.float16),
        spec=spec,
        out_features=out_features,
        in_features=in_features,
    )



@QUANTIZERS.register("rtn")
class RtnQuantizer(Quantizer):
    """Round to nearest (`quantize_rtn`): no calibration data, the shared bitstream format."""

    name: ClassVar[str] = "rtn"
    needs_hessian: ClassVar[bool] = False
    storage: ClassVar[str] = PackFormat.BITSTREAM.value
    shares_hessian: ClassVar[bool] = False

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        return quantize_rtn(weight, spec, hessian)
