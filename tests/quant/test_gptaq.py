"""GPTAQ against GPTQ (equal on equal streams, better on shifted ones), against a naive unblocked reference,
on real layer streams of a tiny model; the cross-term accumulator and its collection beside the Hessians."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import random_windows, tiny_model
from gptq_reference import naive_gptq
from torch import nn

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerAction, Plan, QuantSpec
from layerwise.engine.applier import apply_plan
from layerwise.model.adapter import decoder_layers, linear_modules
from layerwise.quant import (
    QUANTIZERS,
    AsymmetricHessian,
    CrossTermAccumulator,
    GptaqQuantizer,
    HessianAccumulator,
    QuantLinear,
    SharedInputHessians,
    quantize_gptaq,
    quantize_gptq,
    unpack,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * 0.02
    w *= torch.logspace(-1, 1, out_features)[:, None]
    return w


def correlated_inputs(n_tokens: int, in_features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_tokens, in_features, generator=gen)
    return z @ (torch.randn(in_features, in_features, generator=gen) / math.sqrt(in_features))


def streams(n_tokens: int, in_features: int, noise: float, seed: int,
            independent: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_fp, X_q): the quantized stream drifted from the full-precision one, ``X_q = X_fp + noise``.

    The noise is mostly ``noise * X_fp E`` (E random, (K, K) / sqrt(K)): upstream quantization error is a
    function of each token, not independent of it. `independent` adds isotropic noise of that relative
    size, most of which no weight can cancel (it lies outside the span of X's columns).
    """
    x_fp = correlated_inputs(n_tokens, in_features, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    drift = x_fp @ (torch.randn(in_features, in_features, generator=gen) / math.sqrt(in_features))
    return x_fp, x_fp + noise * drift + independent * x_fp.std() * torch.randn(x_fp.shape, generator=gen)


def stats(x_fp: torch.Tensor, x_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, c = HessianAccumulator(x_q.shape[-1]), CrossTermAccumulator(x_q.shape[-1])
    h.add(x_q)
    c.add(x_q, x_fp)
    return h.hessian, c.cross


def asymmetric_error(x_fp: torch.Tensor, x_q: torch.Tensor, weight: torch.Tensor, qw) -> float:
    """``||W X_fp - Q X_q||``: what GPTAQ minimises (tokens as rows here)."""
    deq = QuantLinear.from_quantized(qw, None).dequantize(torch.float32)
    return float(torch.linalg.matrix_norm(x_fp @ weight.T - x_q @ deq.T))


def same_result(a, b) -> bool:
    return torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales) and (
        (a.zeros is None and b.zeros is None) or torch.equal(a.zeros, b.zeros))


# --- equal to GPTQ where the streams agree ----------------------------------------------------------------


@pytest.mark.parametrize("act_order", (False, True))
@pytest.mark.parametrize("sym", (False, True))
@pytest.mark.parametrize("bits", (2, 4))
def test_equal_streams_give_gptq_bit_for_bit(act_order: bool, sym: bool, bits: int) -> None:
    """X_fp = X_q makes the cross term exactly zero, so P is exactly zero and adding it changes no float:
    codes, scales and zeros are GPTQ's bit for bit (not merely within a tolerance)."""
    x = correlated_inputs(256, 96, seed=bits)
    hessian, cross = stats(x, x)
    assert not cross.any()
    weight = random_weight(48, 96, seed=bits)
    spec = QuantSpec(bits, 32, "gptaq", sym)
    asym = quantize_gptaq(weight, spec, hessian, cross, act_order=act_order, block_size=20)
    plain = quantize_gptq(weight, spec, hessian, act_order=act_order, block_size=20)
    assert same_result(asym, plain)


def test_alpha_zero_is_gptq() -> None:
    x_fp, x_q = streams(256, 64, noise=0.3, seed=5)
    hessian, cross = stats(x_fp, x_q)
    weight = random_weight(32, 64, seed=5)
    spec = QuantSpec(3, 32, "gptaq")
    assert same_result(quantize_gptaq(weight, spec, hessian, cross, alpha=0.0), quantize_gptq(weight, spec, hessian))
    assert not same_result(quantize_gptaq(weight, spec, hessian, cross), quantize_gptq(weight, spec, hessian))


# --- better than GPTQ where they do not -------------------------------------------------------------------


@pytest.mark.parametrize("independent", (0.0, 0.3))
@pytest.mark.parametrize("bits", (3, 4))
@pytest.mark.parametrize("act_order", (False, True))
def test_lower_asymmetric_error_than_gptq_on_noisy_inputs(independent: float, bits: int, act_order: bool) -> None:
    """(Isotropic noise alone is not a test of it: at 10% of X's scale GPTAQ's error was 0.975-1.017x
    GPTQ's over 24 draws, since almost none of that noise can be cancelled and rounding luck decides.)"""
    x_fp, x_q = streams(1024, 96, 0.3, seed=bits, independent=independent)
    hessian, cross = stats(x_fp, x_q)
    weight = random_weight(64, 96, seed=7)
    spec = QuantSpec(bits, 32, "gptaq")
    gptq = asymmetric_error(x_fp, x_q, weight, quantize_gptq(weight, spec, hessian, act_order=act_order))
    errors = [asymmetric_error(x_fp, x_q, weight, quantize_gptaq(weight, spec, hessian, cross, alpha=a,
                                                                  act_order=act_order)) for a in (0.25, 1.0)]
    assert errors[0] < gptq
    assert errors[1] < errors[0]  # more of the correction, less of the asymmetric error on these tokens


@pytest.mark.parametrize("arch", ("llama", "qwen2"))
def test_lower_asymmetric_error_on_real_layer_streams(arch: str) -> None:
    """Layer 2's linears of a tiny model: X_fp from the float model, X_q from one whose layers 0-1 are RTN
    2-bit. GPTAQ's ||W X_fp - Q X_q|| is below GPTQ's for every linear."""
    windows = random_windows(16, 32, seed=1)
    fp = tiny_model(arch, n_layers=4)
    drifted = copy.deepcopy(fp)
    plan = Plan([LayerAction(i, "quantize", bits=2, group_size=32, method="rtn") if i < 2 else LayerAction(i, "keep")
                 for i in range(4)])
    apply_plan(drifted, plan, "rtn", progress=False)
    x_fp, x_q = layer_inputs(fp, 2, windows), layer_inputs(drifted, 2, windows)
    for name, module in linear_modules(decoder_layers(fp)[2]).items():
        hessian, cross = stats(x_fp[name], x_q[name])
        weight = module.weight.detach()
        spec = QuantSpec(3, 32, "gptaq")
        gptq = asymmetric_error(x_fp[name], x_q[name], weight, quantize_gptq(weight, spec, hessian))
        gptaq = asymmetric_error(x_fp[name], x_q[name], weight, quantize_gptaq(weight, spec, hessian, cross))
        assert gptaq < gptq, name


def layer_inputs(model: nn.Module, index: int, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}

    def hook(name: str):
        return lambda module, args, output: got.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))

    handles = [m.register_forward_hook(hook(n)) for n, m in linear_modules(decoder_layers(model)[index]).items()]
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    return got


# --- the blocked sweep is the literal update rule --------------------------------------------------------


@pytest.mark.parametrize("act_order", (False, True))
@pytest.mark.parametrize("bits", (3, 4))
def test_matches_naive_reference(act_order: bool, bits: int) -> None:
    """in_features 40, groups of 16, blocks of 12: groups straddle blocks (the pending-update path)."""
    x_fp, x_q = streams(200, 40, noise=0.3, seed=bits)
    hessian, cross = stats(x_fp, x_q)
    weight = random_weight(8, 40, seed=bits)
    spec = QuantSpec(bits, 16, "gptaq")
    qw = quantize_gptaq(weight, spec, hessian, cross, alpha=0.5, block_size=12, act_order=act_order)
    expected = naive_gptq(weight, hessian, spec, act_order, cross=cross, alpha=0.5)
    # float32 vs float64 can flip a code that sits on a rounding boundary; anything more is a bug.
    assert int((unpack(qw.qweight, bits, 40) != expected).sum()) <= expected.numel() // 100


@pytest.mark.parametrize("act_order", (False, True))
def test_block_size_only_changes_speed(act_order: bool) -> None:
    x_fp, x_q = streams(512, 96, noise=0.3, seed=3)
    hessian, cross = stats(x_fp, x_q)
    weight = random_weight(64, 96, seed=3)
    spec = QuantSpec(4, 32, "gptaq")
    results = [quantize_gptaq(weight, spec, hessian, cross, block_size=b, act_order=act_order) for b in (1, 20, 128)]
    reference = unpack(results[0].qweight, 4, 96)
    for qw in results[1:]:
        assert int((unpack(qw.qweight, 4, 96) != reference).sum()) <= reference.numel() // 100


def test_dead_inputs_give_zero_columns() -> None:
    x_fp, x_q = streams(256, 64, noise=0.3, seed=9)
    x_q[:, [3, 40]] = 0.0  # never fire in the quantized stream, though they do in the float one
    hessian, cross = stats(x_fp, x_q)
    weight = random_weight(16, 64, seed=9)
    qw = quantize_gptaq(weight, QuantSpec(4, 32, "gptaq", sym=True), hessian, cross)
    deq = QuantLinear.from_quantized(qw, None).dequantize()
    assert torch.isfinite(deq).all() and not deq[:, [3, 40]].any()


# --- the quantizer class, bad input ----------------------------------------------------------------------


def test_registered_with_its_capabilities_and_dispatching_on_what_it_gets() -> None:
    cls = QUANTIZERS.get("gptaq")
    assert cls is GptaqQuantizer and cls.needs_hessian and cls.needs_reference_inputs and cls.shares_hessian
    assert not any(QUANTIZERS.get(n).needs_reference_inputs for n in QUANTIZERS.names() if n != "gptaq")
    x_fp, x_q = streams(256, 64, noise=0.3, seed=2)
    hessian, cross = stats(x_fp, x_q)
    weight = random_weight(16, 64, seed=2)
    spec = QuantSpec(3, 32, "gptaq")
    assert same_result(cls().quantize(weight, spec, AsymmetricHessian(hessian, cross)),
                       quantize_gptaq(weight, spec, hessian, cross))
    # A plain H: the inputs are the full-precision ones (the sensitivity scorer's case), which is GPTQ.
    assert same_result(cls().quantize(weight, spec, hessian), quantize_gptq(weight, spec, hessian))


def test_rejects_bad_inputs() -> None:
    x_fp, x_q = streams(128, 32, noise=0.3, seed=4)
    hessian, cross = stats(x_fp, x_q)
    weight = random_weight(8, 32, seed=4)
    spec = QuantSpec(4, 32, "gptaq")
    with pytest.raises(LayerwiseError, match="GPTAQ needs calibration inputs"):
        GptaqQuantizer().quantize(weight, spec, None)
    with pytest.raises(LayerwiseError, match=r"cross term has shape \(16, 16\).*must be \(32, 32\)"):
        quantize_gptaq(weight, spec, hessian, cross[:16, :16])
    bad = cross.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(LayerwiseError, match="cross term contains NaN"):
        quantize_gptaq(weight, spec, hessian, bad)
    with pytest.raises(LayerwiseError, match="alpha must be a finite non-negative"):
        quantize_gptaq(weight, spec, hessian, cross, alpha=-1.0)


# --- the cross term and its collection ---------------------------------------------------------------------


def test_cross_accumulator_is_the_normalised_product_and_batches_combine_exactly() -> None:
    x_fp, x_q = streams(300, 24, noise=0.5, seed=6)
    whole = CrossTermAccumulator(24)
    whole.add(x_q, x_fp)
    torch.testing.assert_close(whole.cross, 2 * (x_fp - x_q).T @ x_q / 300, rtol=1e-5, atol=1e-6)
    parts = CrossTermAccumulator(24)
    for rows in (slice(0, 100), slice(100, 120), slice(120, 300)):
        parts.add(x_q[rows], x_fp[rows])
    assert parts.n_tokens == 300
    torch.testing.assert_close(parts.cross, whole.cross, rtol=1e-5, atol=1e-6)
    x_fp_before = x_fp.clone()
    parts.add(x_q, x_fp)
    assert torch.equal(x_fp, x_fp_before)  # the reference inputs are read, never written
    with pytest.raises(LayerwiseError, match="do not pair"):
        parts.add(x_q, x_fp[:10])
    with pytest.raises(LayerwiseError, match="no calibration inputs"):
        _ = CrossTermAccumulator(24).cross


def test_collector_pairs_the_streams_and_shares_by_input() -> None:
    """Two reads of one input (q and k) share one AsymmetricHessian; a module outside `cross` gets plain H."""
    proj = {"q": nn.Linear(16, 8), "k": nn.Linear(16, 8), "o": nn.Linear(8, 4)}

    def forward(x: torch.Tensor) -> None:
        proj["o"](proj["q"](x) * proj["k"](x))

    x_fp, x_q = streams(64, 16, noise=0.3, seed=8)
    collector = SharedInputHessians(proj, cross={"q", "k"})
    with torch.no_grad():
        for rows in (slice(0, 40), slice(40, 64)):
            with collector.reference_pass():
                forward(x_fp[rows])
            with collector:
                forward(x_q[rows])
    out = collector.hessians()
    assert isinstance(out["q"], AsymmetricHessian) and out["q"] is out["k"] and torch.is_tensor(out["o"])
    hessian, cross = stats(x_fp, x_q)
    torch.testing.assert_close(out["q"].hessian, hessian)
    torch.testing.assert_close(out["q"].cross, cross, rtol=1e-5, atol=1e-6)
    unpaired = SharedInputHessians(proj, cross={"q"})
    with torch.no_grad(), pytest.raises(LayerwiseError, match="no full-precision input.*reference_pass"), unpaired:
        forward(x_q)
