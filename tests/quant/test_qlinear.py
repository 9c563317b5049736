"""QuantLinear and quantize_module: same function as the original layer, checkpoint round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.kernels import dequant_matmul
from layerwise.quant import QuantLinear, linear_weight, quantize_module, quantize_rtn, relative_error

IN, OUT = 96, 40  # 96 = 64 + 32: group_size 64 is fitted to 32 (`QuantSpec.fit`)


def make_linear(kind: str, bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(IN, OUT, bias=bias)
    module = Conv1D(OUT, IN)  # GPT-2 Conv1D(nf=out, nx=in), weight stored (in, out)
    nn.init.normal_(module.bias, std=0.1)
    return module


def inputs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("kind", ("linear", "conv1d"))
@pytest.mark.parametrize("sym", (False, True))
def test_forward_is_x_times_dequantized_weight(kind: str, sym: bool) -> None:
    module = make_linear(kind)
    qlinear = quantize_module(module, QuantSpec(4, 64, "rtn", sym))
    x = inputs()
    expected = x @ qlinear.dequantize().T + module.bias.detach()
    torch.testing.assert_close(qlinear(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ("linear", "conv1d"))
def test_eight_bit_matches_original_module(kind: str) -> None:
    module = make_linear(kind)
    qlinear = quantize_module(module, QuantSpec(8, 64))
    x = inputs()
    with torch.no_grad():
        reference = module(x)
    rel = torch.linalg.vector_norm(qlinear(x) - reference) / torch.linalg.vector_norm(reference)
    assert rel < 1e-2
    assert 0 < relative_error(module, qlinear) < 1e-2
    assert relative_error(linear_weight(module), qlinear) == relative_error(module, qlinear)


def test_conv1d_weight_is_transposed() -> None:
    conv = make_linear("conv1d")
    assert linear_weight(conv).shape == (OUT, IN)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(x @ linear_weight(conv).T + conv.bias, conv(x))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_output_dtype_follows_input(dtype: torch.dtype) -> None:
    module = make_linear("linear")
    qlinear = quantize_module(module, QuantSpec(4, 32))
    x = inputs(dtype)
    out = qlinear(x)
    assert out.dtype == dtype and out.shape == (2, 5, OUT)
    expected = (x.float() @ qlinear.dequantize().T + module.bias.detach()).to(dtype)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("sym", (False, True))
@pytest.mark.parametrize("bias", (False, True))
def test_state_dict_keys_and_empty_round_trip(sym: bool, bias: bool) -> None:
    module = make_linear("linear", bias=bias)
    spec = QuantSpec(3, 64, "rtn", sym)
    qlinear = quantize_module(module, spec)
    state = qlinear.state_dict()
    assert set(state) == {"qweight", "scales"} | ({"zeros"} if not sym else set()) | ({"bias"} if bias else set())
    assert state["qweight"].dtype == torch.int32 and state["scales"].dtype == torch.float16
    assert qlinear.storage_bits() == sum(t.numel() * t.element_size() * 8 for k, t in state.items() if k != "bias")

    assert qlinear.spec == spec.fit(IN) and qlinear.group_size == 32  # 64 does not divide 96: 32 does
    loaded = QuantLinear.empty(IN, OUT, qlinear.spec, bias=bias, dtype=torch.float32)
    assert set(loaded.state_dict()) == set(state)
    assert all(loaded.state_dict()[k].shape == t.shape for k, t in state.items())
    loaded.load_state_dict(state)
    x = inputs()
    assert torch.equal(loaded(x), qlinear(x))


def test_bias_keeps_its_dtype_and_whole_model_casts_keep_the_format() -> None:
    module = make_linear("linear").to(torch.bfloat16)
    qlinear = quantize_module(module, QuantSpec(4, 64))
    assert qlinear.bias.dtype == torch.bfloat16
    before = qlinear.dequantize()
    qlinear.to(torch.float32)
    assert qlinear.scales.dtype == torch.float16 and qlinear.zeros.dtype == torch.int32
    assert qlinear.qweight.dtype == torch.int32 and qlinear.bias.dtype == torch.float32
    assert torch.equal(qlinear.dequantize(), before)


def test_repr_and_attributes() -> None:
    qlinear = quantize_module(make_linear("linear"), QuantSpec(2, 32, "rtn", True))
    text = repr(qlinear)
    for part in (f"in_features={IN}", f"out_features={OUT}", "bits=2", "group_size=32", "sym=True", "method=rtn"):
        assert part in text
    assert qlinear.spec == QuantSpec(2, 32, "rtn", True)


def test_from_quantized_equals_kernel_call() -> None:
    weight = torch.randn(OUT, IN)
    bias = torch.randn(OUT)
    qw = quantize_rtn(weight, QuantSpec(4, 32))
    qlinear = QuantLinear.from_quantized(qw, bias)
    x = inputs()
    direct = dequant_matmul(x, qw.qweight, qw.scales, qw.zeros, 4, 32, IN, False, bias)
    assert torch.equal(qlinear(x), direct)
    assert torch.equal(qlinear.dequantize(), qw.dequantize())


def test_quantize_module_refuses_other_modules_and_methods() -> None:
    with pytest.raises(LayerwiseError, match="Conv1d"):
        quantize_module(nn.Conv1d(4, 4, 1), QuantSpec(4, 32))
    with pytest.raises(LayerwiseError, match="unknown quantization method"):
        quantize_module(make_linear("linear"), QuantSpec(4, 32, "no-such-method"))


def test_tiny_gpt2_with_every_conv1d_quantized_keeps_its_logits() -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    names = [name for name, mod in model.named_modules() if isinstance(mod, Conv1D)]
    assert names
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantize_module(getattr(parent, child), QuantSpec(8, 32)))
    with torch.no_grad():
        logits = model(ids).logits
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    rel = torch.linalg.vector_norm(logits - reference) / torch.linalg.vector_norm(reference)
    assert rel < 1e-2
