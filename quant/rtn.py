"""Group-wise round-to-nearest (RTN) quantization.

Each group's scale and zero come from its grid (`layerwise.quant.grid`: min/max by default, or the
error-minimising ``mse`` search, unweighted here since RTN reads no calibration data), then every weight
is rounded to the nearest point of it. The conventions (asymmetric range containing 0, symmetric
zero ``2**(bits-1)``, fp16 scales rounded before the codes are chosen) are written out in that module;
`group_params` and `quantize_codes` are re-exported here, where callers found them before.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from layerwise.core.bitstream import PackFormat, pack, pack_zeros, row_chunks
from layerwise.core.gguf_types import GGUF_TYPES
from layerwise.core.types import QuantSpec
from layerwise.quant.gguf_grid import gguf_grid, pack_blocks
from layerwise.quant.grid import group_params, grouped_params, quantize_codes
from layerwise.quant.quantized import QuantizedWeight, check_weight
from layerwise.quant.registry import QUANTIZERS, Quantizer

__all__ = ["RtnQuantizer", "group_params", "quantize_codes", "quantize_rtn"]


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """Round every weight to the nearest point of its group's grid; `hessian` is accepted and ignored.

    The weight is (out_features, in_features); groups run along in_features.
    """
    del hessian  # RTN uses no calibration data; the argument keeps the common quantizer signature
    check_weight(weight, "RTN")
    if spec.gguf is not None:
        return quantize_gguf_rtn(weight, spec)
    out_features, in_features = weight.shape
    n_groups = spec.n_groups(in_features)
    width = spec.group_size if n_groups > 1 else in_features
    weight = weight.detach()
    scale, zero = grouped_params(weight, spec)
    codes = torch.empty(out_features, in_features, dtype=torch.int32, device=weight.device)
    # Rows are independent: quantized a few at a time, so the temporaries stay small (same values).
    for rows in row_chunks(out_features, n_groups * width):
        m = rows.stop - rows.start
        # Zero padding is harmless: every grid has 0 on it, so a padded 0 takes the zero's code; the
        # padded codes are cut off again below.
        w = F.pad(weight[rows].to(torch.float32), (0, n_groups * width - in_features)).view(m, n_groups, width)
        chunk = quantize_codes(w, scale[rows, :, None], zero[rows, :, None], spec.bits)
        codes[rows] = chunk.view(m, n_groups * width)[:, :in_features]
    return QuantizedWeight(
        qweight=pack(codes, spec.bits),
        scales=scale.to(torch.float16),
        zeros=None if spec.sym else pack_zeros(zero, spec.bits),
        spec=spec,
        out_features=out_features,
        in_features=in_features,
    )


def quantize_gguf_rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round to nearest on the GGUF type's own grid (`layerwise.quant.gguf_grid`), stored as its blocks."""
    assert spec.gguf is not None
    grid = gguf_grid(weight, GGUF_TYPES[spec.gguf])
    return QuantizedWeight(qweight=pack_blocks(grid, grid.codes(weight.detach().to(torch.float32))), scales=None,
                           zeros=None, spec=spec, out_features=weight.shape[0], in_features=weight.shape[1])


@QUANTIZERS.register("rtn")
class RtnQuantizer(Quantizer):
    """Round to nearest (`quantize_rtn`): no calibration data, the shared bitstream format."""

    name: ClassVar[str] = "rtn"
    needs_hessian: ClassVar[bool] = False
    storage: ClassVar[str] = PackFormat.BITSTREAM.value
    shares_hessian: ClassVar[bool] = False

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        return quantize_rtn(weight, spec, hessian)
