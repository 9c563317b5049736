"""One GPTQ sweep for weights that share an input, Hessians shared by input identity, dense-weight caching."""

from __future__ import annotations

import pytest
import torch
from conftest import random_windows, tiny_model
from test_gptq import codes_of, correlated_inputs, hessian_of, random_weight
from torch import nn

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.model.adapter import decoder_layers, linear_modules
from layerwise.quant import (
    HessianAccumulator,
    HessianFactor,
    SharedInputHessians,
    dense_weights,
    quantize_gptq,
    quantize_gptq_shared,
    quantize_module,
    quantize_modules,
)


@pytest.mark.parametrize(
    ("act_order", "group_sizes"), ((False, (32, 32, 32)), (True, (32, 32, 32)), (True, (32, 64, 48)))
)
def test_shared_sweep_equals_separate_runs(act_order: bool, group_sizes: tuple[int, ...]) -> None:
    hessian = hessian_of(correlated_inputs(400, 96, seed=1))
    weights = [random_weight(16, 96, seed=s) for s in (1, 2, 3)]
    bits_sym = ((2, False), (4, True), (8, False))
    specs = [QuantSpec(b, g, "gptq", sym) for (b, sym), g in zip(bits_sym, group_sizes, strict=True)]
    together = quantize_gptq_shared(weights, specs, hessian, act_order=act_order)
    for weight, spec, qw in zip(weights, specs, together, strict=True):
        alone = quantize_gptq(weight, spec, hessian, act_order=act_order)
        assert qw.spec == spec and (qw.out_features, qw.in_features) == (16, 96)
        assert int((codes_of(qw) != codes_of(alone)).sum()) <= codes_of(alone).numel() // 100
        torch.testing.assert_close(qw.scales, alone.scales)
        assert (qw.zeros is None) == spec.sym


def test_a_factor_is_reusable_and_matches_the_raw_hessian() -> None:
    hessian = hessian_of(correlated_inputs(400, 96, seed=2))
    weight = random_weight(16, 96, seed=4)
    spec = QuantSpec(3, 32, "gptq")
    factor = HessianFactor.of(hessian)
    first, second = quantize_gptq(weight, spec, factor), quantize_gptq(weight, spec, factor)
    direct = quantize_gptq(weight, spec, hessian)
    assert torch.equal(codes_of(first), codes_of(second))
    assert torch.equal(codes_of(first), codes_of(direct))


def test_shared_sweep_rejects_mixed_group_sizes_without_act_order_and_bad_counts() -> None:
    hessian = hessian_of(correlated_inputs(200, 64, seed=3))
    w = random_weight(8, 64, seed=1)
    mixed = [QuantSpec(4, 32, "gptq"), QuantSpec(4, 64, "gptq")]
    with pytest.raises(LayerwiseError, match="without act-order.*share a group size"):
        quantize_gptq_shared([w, w], mixed, hessian, act_order=False)
    assert len(quantize_gptq_shared([w, w], mixed, hessian, act_order=True)) == 2
    with pytest.raises(LayerwiseError, match="one spec per weight"):
        quantize_gptq_shared([w, w], [QuantSpec(4, 32, "gptq")], hessian)
    with pytest.raises(LayerwiseError, match="calibration inputs"):
        quantize_gptq_shared([w], [QuantSpec(4, 32, "gptq")], None)


def test_quantize_modules_matches_one_by_one() -> None:
    torch.manual_seed(0)
    shared = hessian_of(correlated_inputs(300, 64, seed=5))
    other = hessian_of(correlated_inputs(300, 64, seed=6))
    modules = [nn.Linear(64, 24), nn.Linear(64, 8, bias=False), nn.Linear(64, 16), nn.Linear(64, 16)]
    jobs = [
        (modules[0], QuantSpec(3, 32, "gptq"), shared),
        (modules[1], QuantSpec(4, 32, "gptq"), shared),
        (modules[2], QuantSpec(4, 32, "gptq"), other),
        (modules[3], QuantSpec(4, 32, "rtn"), None),
    ]
    batched = quantize_modules(jobs)
    assert len(batched) == len(jobs)
    for (module, spec, hessian), qlinear in zip(jobs, batched, strict=True):
        alone = quantize_module(module, spec, hessian)
        assert qlinear.spec == spec
        torch.testing.assert_close(qlinear.dequantize(), alone.dequantize(), rtol=0, atol=1e-6)
        assert (qlinear.bias is None) == (module.bias is None)


@pytest.mark.parametrize("arch", ("llama", "gpt2", "phi3"))
def test_layer_hessians_are_shared_by_input_identity(arch: str) -> None:
    model = tiny_model(arch)
    layer = decoder_layers(model)[1]
    modules = linear_modules(layer)
    separate = {}
    for name, module in modules.items():
        in_features = module.weight.shape[0 if type(module).__name__ == "Conv1D" else 1]
        separate[name] = HessianAccumulator(in_features)
    handles = [separate[n].hook(m) for n, m in modules.items()]
    with torch.no_grad(), SharedInputHessians(modules) as collector:
        model(input_ids=random_windows(2, 16))
    for handle in handles:
        handle.remove()
    shared = collector.hessians()
    assert set(shared) == set(modules)
    for name in modules:
        torch.testing.assert_close(shared[name], separate[name].hessian)
    if arch == "llama":
        attention = {id(shared[f"self_attn.{p}_proj"]) for p in "qkv"}
        mlp = {id(shared[f"mlp.{p}_proj"]) for p in ("gate", "up")}
        assert len(attention) == 1 and len(mlp) == 1
        assert id(shared["self_attn.o_proj"]) not in attention | mlp
        assert len(collector.accumulators) == 4  # qkv, o, gate/up, down
    # the hooks are gone: another forward adds nothing
    before = {n: t for n, t in collector.token_counts().items()}
    with torch.no_grad():
        model(input_ids=random_windows(1, 16))
    assert collector.token_counts() == before


def test_a_module_no_input_reached_is_named() -> None:
    modules = {"used": nn.Linear(8, 4), "unused": nn.Linear(8, 4)}
    with SharedInputHessians(modules) as collector:
        modules["used"](torch.randn(3, 8))
    with pytest.raises(LayerwiseError, match="unused"):
        collector.hessians()


def test_dense_weights_give_the_same_outputs_and_clean_up() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    qlinear = quantize_module(linear, QuantSpec(3, 32, "rtn"))
    x = torch.randn(5, 64)
    expected = qlinear(x)
    with dense_weights([qlinear, nn.ReLU()]):
        assert "_dense" in qlinear.__dict__
        torch.testing.assert_close(qlinear(x), expected)
    assert "_dense" not in qlinear.__dict__
    assert "_dense" not in qlinear.state_dict()
