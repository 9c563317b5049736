"""`QuantizedWeight`: what every quantizer returns, whatever its method (RTN, GPTQ, ...).

Keeping one result type means `QuantLinear`, checkpoint writers and kernels never need to know which
algorithm chose the codes: only the spec and the packed layout matter once quantization is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerwise.core.bitstream import PackFormat
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.model.adapter import all_finite  # noqa: F401  (re-exported)
from layerwise.quant.codecs import BUFFER_NAMES, codec_for


@dataclass
class QuantizedWeight:
    """A (out_features, in_features) weight as stored codes plus whatever scales its format keeps.

    The storage format follows from ``spec.method`` (`layerwise.quant.codecs.codec_for`): for RTN and GPTQ
    it is ``bitstream-v1`` packed codes with per-group fp16 scales and zeros, `zeros` being None exactly
    when `spec.sym` (the symmetric zero is the constant 2**(bits-1)); groups are `spec.group_size`
    consecutive input columns, G = ceil(in_features / group_size), and a last, shorter group has its own
    scale and zero. The bitsandbytes methods (nf4, int8) keep bitsandbytes' own tensors instead, see
    `layerwise.quant.bnb`. `format` names the layout and is filled in from the method when not given.
    Shapes and dtypes are checked on construction so a malformed result fails where it is made, not
    later inside a matmul.
    """

    qweight: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    spec: QuantSpec
    out_features: int
    in_features: int
    format: PackFormat | str | None = None

    def __post_init__(self) -> None:
        codec = codec_for(self.spec)
        problems = []
        name = str(getattr(codec.format, "value", codec.format))
        if self.format is not None and self.format != codec.format:
            problems.append(f"method {self.spec.method!r} stores format {name!r}, not {self.format!r}")
        self.format = codec.format
        layout = codec.layout(self.out_features, self.in_features, self.spec)
        for buffer in BUFFER_NAMES:
            tensor, want = getattr(self, buffer), layout[buffer]
            if want is None:
                if tensor is not None:
                    problems.append(
                        "a symmetric weight stores no zeros" if buffer == "zeros" and self.spec.sym
                        else f"format {name!r} stores no {buffer}"
                    )
            elif tensor is None or tensor.dtype != want.dtype or tuple(tensor.shape) != want.shape:
                got = "None" if tensor is None else f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"
                problems.append(f"{buffer} must be {want.describe()}, got {got}")
        if problems:
            raise LayerwiseError(f"inconsistent quantized weight ({self.spec.label()}): " + "; ".join(problems))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out_features, in_features) weight these codes stand for."""
        return codec_for(self.spec).dequantize(self, dtype)

    def storage_bits(self) -> int:
        """Bits this weight occupies (codes with padding, scales, zeros), as the planner budgets it."""
        return self.spec.storage_bits(self.out_features, self.in_features)


def check_weight(weight: torch.Tensor, method: str) -> None:
    """Refuse what no quantizer can use: anything but a finite 2-D float (out_features, in_features) weight."""
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise LayerwiseError(
            f"{method} expects a 2-D float weight (out_features, in_features), got {weight.dtype} "
            f"of shape {tuple(weight.shape)}"
        )
    if not all_finite(weight):
        raise LayerwiseError("the weight contains NaN or inf values; it cannot be quantized")
