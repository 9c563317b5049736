"""`QuantizedWeight`: what every quantizer returns, whatever its method (RTN, GPTQ, ...).

Keeping one result type means `QuantLinear`, checkpoint writers and kernels never need to know which
algorithm chose the codes: only the spec and the packed layout matter once quantization is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerwise.errors import LayerwiseError
from layerwise.kernels import torch_ref
from layerwise.quant.packing import PackFormat, words_per_row
from layerwise.types import QuantSpec


@dataclass
class QuantizedWeight:
    """A (out_features, in_features) weight as packed codes plus per-group fp16 scales and zeros.

    `zeros` is None exactly when `spec.sym`: the symmetric zero is the constant 2**(bits-1). Groups are
    `spec.group_size` consecutive input columns; G = ceil(in_features / group_size) and a last, shorter
    group has its own scale and zero. Shapes and dtypes are checked on construction so a malformed result
    fails where it is made, not later inside a matmul.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    spec: QuantSpec
    out_features: int
    in_features: int
    format: PackFormat = PackFormat.BITSTREAM

    def __post_init__(self) -> None:
        self.format = PackFormat(self.format)
        n, k = self.out_features, self.in_features
        want_q = (n, words_per_row(k, self.spec.bits))
        want_s = (n, self.spec.n_groups(k))
        problems = []
        if self.qweight.dtype != torch.int32 or tuple(self.qweight.shape) != want_q:
            problems.append(f"qweight must be int32 {want_q}, got {self.qweight.dtype} {tuple(self.qweight.shape)}")
        if self.scales.dtype != torch.float16 or tuple(self.scales.shape) != want_s:
            problems.append(f"scales must be float16 {want_s}, got {self.scales.dtype} {tuple(self.scales.shape)}")
        if self.spec.sym and self.zeros is not None:
            problems.append("a symmetric weight stores no zeros")
        if not self.spec.sym and (
            self.zeros is None or self.zeros.dtype != torch.float16 or tuple(self.zeros.shape) != want_s
        ):
            got = "None" if self.zeros is None else f"{self.zeros.dtype} {tuple(self.zeros.shape)}"
            problems.append(f"zeros must be float16 {want_s}, got {got}")
        if problems:
            raise LayerwiseError(f"inconsistent quantized weight ({self.spec.label()}): " + "; ".join(problems))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out_features, in_features) weight these codes stand for."""
        return torch_ref.dequantize(
            self.qweight,
            self.scales,
            self.zeros,
            self.spec.bits,
            self.spec.group_size,
            self.in_features,
            self.spec.sym,
            dtype,
        )

    def storage_bits(self) -> int:
        """Bits this weight occupies (codes with row padding, scales, zeros), as the planner budgets it."""
        return self.spec.storage_bits(self.out_features, self.in_features)
