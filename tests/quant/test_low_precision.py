"""bf16 / fp16 inputs: Hessians accumulate in float32 and the quantizers compute in float32, so a low-precision
weight quantizes exactly as its (exactly representable) float32 values do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerwise.core.types import QuantSpec
from layerwise.quant import HessianAccumulator, SharedInputHessians, quantize_gptq, quantize_rtn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hessian_of_low_precision_inputs_is_float32(dtype):
    x = torch.randn(3, 40, 16).to(dtype)
    accumulator = HessianAccumulator(16)
    accumulator.add(x[:1])
    accumulator.add(x[1:])
    rows = x.reshape(-1, 16).double()
    assert accumulator.hessian.dtype == torch.float32
    torch.testing.assert_close(accumulator.hessian.double(), 2 * rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)


def test_shared_hessians_of_a_bf16_layer_are_float32():
    layer = nn.ModuleDict({"a": nn.Linear(16, 8), "b": nn.Linear(16, 4)}).to(torch.bfloat16)
    x = torch.randn(2, 30, 16, dtype=torch.bfloat16)
    with SharedInputHessians(dict(layer.items())) as collector:
        layer["a"](x)
        layer["b"](x)
    hessians = collector.hessians()
    assert hessians["a"] is hessians["b"] and hessians["a"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_low_precision_weight_quantizes_as_its_float32_values(dtype, method):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(24, 96, generator=generator) * 0.05).to(dtype)
    x = torch.randn(400, 96, generator=generator)
    hessian = 2 * x.T @ x / x.shape[0]
    spec = QuantSpec(3, 32, method)
    quantize = quantize_gptq if method == "gptq" else quantize_rtn
    low, full = quantize(weight, spec, hessian), quantize(weight.float(), spec, hessian)
    assert torch.equal(low.qweight, full.qweight)
    assert torch.equal(low.scales, full.scales) and torch.equal(low.zeros, full.zeros)
