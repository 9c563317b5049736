"""Reference (plain torch, any device) dequantization and dequantize-then-matmul.

This is the one place that turns packed codes back into weights: `QuantizedWeight.dequantize`,
`QuantLinear.forward` and the tests all go through `dequantize` here, so the math cannot drift between
them, and faster kernels (Triton, later in this package) are checked against it.

Math, per group of `group_size` input columns (the last group may be shorter)::

    w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g],   g = k // group_size

with ``zero = 2**(bits-1)`` when symmetric (not stored); asymmetric zeros arrive packed
(`layerwise.core.bitstream.pack_zeros`: int32 (ceil(N*bits/32), G)). It is evaluated in float32: ``q - zero`` is a
small integer and the scale a fp16 value, so the product is exact and only the final cast to `dtype`
rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layerwise.core import bitstream as packing


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    sym: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Weights (out_features, in_features) in `dtype` from packed codes and per-group scales / zeros."""
    n_rows, n_groups = scales.shape
    width = group_size if n_groups > 1 else in_features
    if not sym and zeros is None:
        raise ValueError("asymmetric dequantization needs zeros")
    unpacked = None if sym else packing.unpack_zeros(zeros, bits, n_rows)  # type: ignore[arg-type]
    out = torch.empty(n_rows, in_features, dtype=dtype, device=qweight.device)
    # Rows are independent: a few at a time into `out`, so the temporaries stay small (same values).
    for rows in packing.row_chunks(n_rows, n_groups * width):
        codes = packing.unpack(qweight[rows], bits, in_features)
        m = codes.shape[0]
        # View the codes as (rows, groups, width), padding a short last group, so that scales and zeros
        # broadcast per group instead of being gathered per column.
        grouped = F.pad(codes, (0, n_groups * width - in_features)).view(m, n_groups, width).to(torch.float32)
        if sym:
            centred = grouped - float(2 ** (bits - 1))
        else:
            assert unpacked is not None
            centred = grouped - unpacked[rows].to(torch.float32).unsqueeze(-1)
        weight = centred * scales[rows].to(torch.float32).unsqueeze(-1)
        out[rows] = weight.view(m, n_groups * width)[:, :in_features]
    return out


def dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    sym: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` computed in x's dtype, as the unquantized linear in that dtype would.

    The full weight is materialised for every call: this path favours being obviously right over being
    fast or memory-lean, which is the job of the fused kernels.
    """
    weight = dequantize(qweight, scales, zeros, bits, group_size, in_features, sym, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
