"""GPTQ against RTN, against a naive unblocked reference, and on degenerate Hessians; the accumulator."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from gptq_reference import naive_gptq
from torch import nn
from transformers.pytorch_utils import Conv1D

from layerwise.core.bitstream import unpack_zeros, words_per_row
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.quant import (
    QUANTIZERS,
    CrossTermAccumulator,
    GptqQuantizer,
    HessianAccumulator,
    QuantLinear,
    RtnQuantizer,
    min_calibration_tokens,
    quantize_gptq,
    quantize_module,
    quantize_rtn,
    unpack,
)
from layerwise.quant.hessian import BLOCK_ROWS

BITS = (2, 3, 4, 8)
# (out_features, in_features, group_size): full groups, and 576 = 4*128 + 64 with a partial last group.
SHAPES = ((64, 96, 32), (48, 576, 128))
N_TOKENS = 512


def random_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * 0.02
    w *= torch.logspace(-1, 1, out_features)[:, None]  # rows of different magnitudes
    w[0, 3] = 0.5  # an outlier
    return w


def correlated_inputs(n_tokens: int, in_features: int, seed: int) -> torch.Tensor:
    """X = Z @ A: mixing independent features makes inputs correlated, as activations are."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_tokens, in_features, generator=gen)
    a = torch.randn(in_features, in_features, generator=gen) / math.sqrt(in_features)
    return z @ a


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian


def output_error(x: torch.Tensor, weight: torch.Tensor, deq: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x @ weight.T - x @ deq.T))


def codes_of(qw) -> torch.Tensor:
    return unpack(qw.qweight, qw.spec.bits, qw.in_features)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """GPTQ's column loop runs hundreds of tiny ops; on a busy CPU intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calibration() -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per in_features: correlated inputs X (512 tokens) and their Hessian."""
    out = {}
    for _, in_features, _ in SHAPES:
        x = correlated_inputs(N_TOKENS, in_features, seed=in_features)
        out[in_features] = (x, hessian_of(x))
    return out


# --- agreement with RTN where GPTQ has nothing to correct ----------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", (False, True))
@pytest.mark.parametrize("act_order", (False, True))
@pytest.mark.parametrize(("out_features", "in_features", "group_size"), SHAPES)
@pytest.mark.parametrize("hessian_kind", ("identity", "diagonal"))
def test_diagonal_hessian_gives_rtn(
    bits: int, sym: bool, act_order: bool, out_features: int, in_features: int, group_size: int, hessian_kind: str
) -> None:
    """A diagonal H couples no columns, so there is no error to feed back: codes, scales, zeros are RTN's.

    That holds with act-order too, because static groups take their ranges from the original weight.
    """
    weight = random_weight(out_features, in_features, seed=bits + in_features)
    if hessian_kind == "identity":
        hessian = torch.eye(in_features)
    else:
        hessian = torch.diag(torch.rand(in_features, generator=torch.Generator().manual_seed(bits)) + 0.1)
    gptq = quantize_gptq(weight, QuantSpec(bits, group_size, "gptq", sym), hessian, act_order=act_order)
    rtn = quantize_rtn(weight, QuantSpec(bits, group_size, "rtn", sym))
    assert torch.equal(gptq.qweight, rtn.qweight)
    assert torch.equal(gptq.scales, rtn.scales)
    assert (gptq.zeros is None) == (rtn.zeros is None) == sym
    if not sym:
        assert torch.equal(gptq.zeros, rtn.zeros)


# --- the point of GPTQ: lower output error on correlated inputs ------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", (False, True))
@pytest.mark.parametrize("group_size", (32, 128))
@pytest.mark.parametrize("act_order", (False, True))
@pytest.mark.parametrize(("out_features", "in_features"), [(s[0], s[1]) for s in SHAPES])
def test_lower_output_error_than_rtn(
    calibration, bits: int, sym: bool, group_size: int, act_order: bool, out_features: int, in_features: int
) -> None:
    x, hessian = calibration[in_features]
    weight = random_weight(out_features, in_features, seed=7 * bits + group_size)
    gptq = quantize_gptq(weight, QuantSpec(bits, group_size, "gptq", sym), hessian, act_order=act_order)
    rtn = quantize_rtn(weight, QuantSpec(bits, group_size, "rtn", sym))
    gptq_error = output_error(x, weight, gptq.dequantize())
    rtn_error = output_error(x, weight, rtn.dequantize())
    # Not just marginally lower: on such inputs GPTQ removes a large share of RTN's output error.
    assert gptq_error < 0.9 * rtn_error


# --- the implementation is the algorithm ----------------------------------------------------------------


@pytest.mark.parametrize("sym", (False, True))
@pytest.mark.parametrize("act_order", (False, True))
@pytest.mark.parametrize("bits", (3, 4))
def test_matches_naive_reference(sym: bool, act_order: bool, bits: int) -> None:
    """Blocked, Cholesky-based GPTQ picks the codes of the literal update rule.

    in_features 40 with groups of 16 has a partial last group; block_size 12 makes groups straddle
    blocks, which exercises the pending-update path of group parameters computed mid-block.
    """
    weight = random_weight(8, 40, seed=bits)
    hessian = hessian_of(correlated_inputs(200, 40, seed=bits))
    spec = QuantSpec(bits, 16, "gptq", sym)
    qw = quantize_gptq(weight, spec, hessian, block_size=12, act_order=act_order)
    expected = naive_gptq(weight, hessian, spec, act_order)
    # float32 vs float64 can flip a code that sits on a rounding boundary; anything more is a bug.
    mismatches = int((codes_of(qw) != expected).sum())
    assert mismatches <= expected.numel() // 100


@pytest.mark.parametrize("act_order", (False, True))
def test_block_size_only_changes_speed(calibration, act_order: bool) -> None:
    x, hessian = calibration[96]
    weight = random_weight(64, 96, seed=11)
    spec = QuantSpec(4, 32, "gptq")
    results = [quantize_gptq(weight, spec, hessian, block_size=b, act_order=act_order) for b in (1, 20, 128)]
    reference = codes_of(results[0])
    for qw in results[1:]:
        assert int((codes_of(qw) != reference).sum()) <= reference.numel() // 100
        assert output_error(x, weight, qw.dequantize()) == pytest.approx(
            output_error(x, weight, results[0].dequantize()), rel=1e-2
        )


# --- act-order keeps RTN's layout -----------------------------------------------------------------------


@pytest.mark.parametrize("sym", (False, True))
def test_act_order_keeps_contiguous_groups(calibration, sym: bool) -> None:
    x, hessian = calibration[576]
    weight = random_weight(48, 576, seed=5)
    bits, group_size = 3, 128
    qw = quantize_gptq(weight, QuantSpec(bits, group_size, "gptq", sym), hessian, act_order=True)
    n_groups = math.ceil(576 / group_size)
    assert qw.scales.shape == (48, n_groups) and qw.scales.dtype == torch.float16
    if not sym:
        assert qw.zeros.shape == (words_per_row(48, bits), n_groups) and qw.zeros.dtype == torch.int32
    # Static groups: ranges of the natural column groups of the original weight, i.e. exactly RTN's.
    assert torch.equal(qw.scales, quantize_rtn(weight, QuantSpec(bits, group_size, "rtn", sym)).scales)

    # Every dequantized weight is (code - zero) * scale with its own contiguous group's scale and zero.
    deq = qw.dequantize()
    codes = codes_of(qw).to(torch.float32)
    group = torch.arange(576) // group_size
    zero = torch.full_like(codes, 2 ** (bits - 1)) if sym else unpack_zeros(qw.zeros, bits, 48).float()[:, group]
    torch.testing.assert_close(deq, (codes - zero) * qw.scales.float()[:, group], rtol=0, atol=0)

    # The packed format round-trips through QuantLinear and its state_dict.
    bias = torch.randn(48)
    module = QuantLinear.from_quantized(qw, bias)
    torch.testing.assert_close(module(x[:16]), x[:16] @ deq.T + bias)
    reloaded = QuantLinear.empty(576, 48, qw.spec, bias=True)
    reloaded.load_state_dict(module.state_dict())
    torch.testing.assert_close(reloaded(x[:16]), module(x[:16]), rtol=0, atol=0)


# --- degenerate Hessians ----------------------------------------------------------------------------------


def test_rank_deficient_hessian_is_damped_without_warning() -> None:
    """32 tokens for 96 inputs: H has rank 32, and the default damping alone makes it invertible."""
    x = correlated_inputs(32, 96, seed=3)
    hessian = hessian_of(x)
    assert int(torch.linalg.matrix_rank(x.double().T @ x.double())) < 96  # float64: rounding noise hides no rank
    weight = random_weight(64, 96, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qw = quantize_gptq(weight, QuantSpec(4, 32, "gptq"), hessian)
    assert torch.isfinite(qw.dequantize()).all()
    assert output_error(x, weight, qw.dequantize()) < output_error(
        x, weight, quantize_rtn(weight, QuantSpec(4, 32)).dequantize()
    )


def test_singular_hessian_without_damping_warns_and_retries() -> None:
    """All inputs equal (every column duplicated): H is rank 1, and with damp=0 its Cholesky must fail."""
    x = torch.ones(64, 1) * torch.randn(64, 1, generator=torch.Generator().manual_seed(0)).sign()
    hessian = hessian_of(x.expand(64, 96))  # = 2 * ones(96, 96): exact, pivots hit exactly 0
    weight = random_weight(64, 96, seed=4)
    with pytest.warns(RuntimeWarning, match=r"singular or ill-conditioned.*damping 0\.01"):
        qw = quantize_gptq(weight, QuantSpec(4, 32, "gptq"), hessian, damp=0.0)
    assert torch.isfinite(qw.dequantize()).all()


def test_duplicated_inputs_quantize_finitely() -> None:
    x = correlated_inputs(256, 96, seed=6)
    x[:, 10:20] = x[:, 40:50]  # ten duplicated input columns
    weight = random_weight(64, 96, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # damp=0 may or may not need a retry here
        qw = quantize_gptq(weight, QuantSpec(3, 32, "gptq"), hessian_of(x), damp=0.0)
    assert torch.isfinite(qw.dequantize()).all()


@pytest.mark.parametrize("act_order", (False, True))
def test_dead_inputs_give_zero_columns(act_order: bool) -> None:
    x = correlated_inputs(256, 96, seed=8)
    dead = [0, 33, 95]
    x[:, dead] = 0.0
    hessian = hessian_of(x)
    assert (hessian.diagonal()[dead] == 0).all()
    weight = random_weight(64, 96, seed=8)
    qw = quantize_gptq(weight, QuantSpec(4, 32, "gptq"), hessian, act_order=act_order)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert (deq[:, dead] == 0).all()  # a dead input's weight never matters; 0 is exactly representable
    rtn = quantize_rtn(weight, QuantSpec(4, 32)).dequantize()
    assert output_error(x, weight, deq) < output_error(x, weight, rtn)


# --- errors and wiring ------------------------------------------------------------------------------------


def test_needs_a_hessian() -> None:
    weight = random_weight(8, 32, seed=0)
    with pytest.raises(LayerwiseError, match="calibration"):
        quantize_gptq(weight, QuantSpec(4, 32, "gptq"))
    with pytest.raises(LayerwiseError, match="calibration"):
        QUANTIZERS.get("gptq")().quantize(weight, QuantSpec(4, 32, "gptq"), None)


def test_rejects_bad_inputs() -> None:
    weight = random_weight(8, 32, seed=0)
    spec = QuantSpec(4, 32, "gptq")
    bad_weight = weight.clone()
    bad_weight[1, 2] = float("nan")
    with pytest.raises(LayerwiseError, match="NaN or inf"):
        quantize_gptq(bad_weight, spec, torch.eye(32))
    bad_hessian = torch.eye(32)
    bad_hessian[0, 0] = float("inf")
    with pytest.raises(LayerwiseError, match="NaN or inf"):
        quantize_gptq(weight, spec, bad_hessian)
    with pytest.raises(LayerwiseError, match="shape"):
        quantize_gptq(weight, spec, torch.eye(31))
    with pytest.raises(LayerwiseError, match="not positive semi-definite"):
        quantize_gptq(weight, spec, -torch.eye(32) * 100)


def test_registry_and_capability_flags() -> None:
    assert QUANTIZERS.get("gptq") is GptqQuantizer and QUANTIZERS.get("rtn") is RtnQuantizer
    assert GptqQuantizer.needs_hessian is True and GptqQuantizer.shares_hessian is True
    assert RtnQuantizer.needs_hessian is False and RtnQuantizer.shares_hessian is False


def test_quantize_module_passes_the_hessian(calibration) -> None:
    x, hessian = calibration[96]
    torch.manual_seed(0)
    linear = nn.Linear(96, 64)
    qlinear = quantize_module(linear, QuantSpec(4, 32, "gptq"), hessian)
    with torch.no_grad():
        expected = linear(x)
    rtn = quantize_module(linear, QuantSpec(4, 32, "rtn"))
    assert float(torch.linalg.matrix_norm(qlinear(x) - expected)) < float(torch.linalg.matrix_norm(rtn(x) - expected))


def test_min_calibration_tokens_is_the_full_rank_threshold() -> None:
    in_features = 48
    needed = min_calibration_tokens(in_features)
    x = correlated_inputs(needed, in_features, seed=1).double()  # float64, so rounding noise adds no rank
    assert int(torch.linalg.matrix_rank(x.T @ x)) == in_features
    assert int(torch.linalg.matrix_rank(x[: needed - 1].T @ x[: needed - 1])) < in_features


# --- HessianAccumulator -----------------------------------------------------------------------------------


def test_accumulator_batches_combine_exactly() -> None:
    x = correlated_inputs(128, 24, seed=2)
    split = HessianAccumulator(24)
    split.add(x[:37])
    split.add(x[37:].reshape(7, 13, 24))  # leading dimensions are all tokens
    whole = HessianAccumulator(24)
    whole.add(x)
    assert split.n_tokens == whole.n_tokens == 128
    torch.testing.assert_close(split.hessian, whole.hessian)
    expected = (2 / 128) * x.double().T @ x.double()
    torch.testing.assert_close(whole.hessian, expected.float())
    assert whole.hessian.dtype == torch.float32


def test_accumulators_are_blocked_exact_sums_independent_of_batch_order() -> None:
    """Wider than one block of rows: H is exactly symmetric, both are the float64 products to float32 rounding,
    and they have the same bits whatever the order of the batches."""
    width = BLOCK_ROWS + 44
    batches = [correlated_inputs(64, width, seed=s) * 10.0 ** (s - 3) for s in range(6)]
    shifts = [torch.randn(64, width, generator=torch.Generator().manual_seed(10 + s)) for s in range(6)]

    def collected(order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = HessianAccumulator(width), CrossTermAccumulator(width)
        for i in order:
            h.add(batches[i])
            c.add(batches[i], batches[i] + shifts[i])
        return h.hessian, c.cross

    h, c = collected([0, 1, 2, 3, 4, 5])
    x, dx = torch.cat(batches).double(), torch.cat(shifts).double()
    assert torch.equal(h, h.T)
    for got, exact in ((h, 2 / 384 * x.T @ x), (c, 2 / 384 * dx.T @ x)):  # float32 products: their rounding
        torch.testing.assert_close(got, exact.float(), rtol=1e-4, atol=1e-5 * float(exact.abs().max()))
    h2, c2 = collected([5, 3, 1, 0, 2, 4])
    assert torch.equal(h, h2) and torch.equal(c, c2)


def test_accumulator_rejects_misuse() -> None:
    acc = HessianAccumulator(24)
    with pytest.raises(LayerwiseError, match="no calibration inputs"):
        _ = acc.hessian
    with pytest.raises(LayerwiseError, match="in_features=24"):
        acc.add(torch.zeros(5, 23))
    with pytest.raises(LayerwiseError, match="for 24 inputs"):
        acc.hook(nn.Linear(23, 8))
    with pytest.raises(LayerwiseError, match="only nn.Linear and Conv1D"):
        acc.hook(nn.ReLU())


@pytest.mark.parametrize("kind", ("linear", "conv1d"))
def test_hook_collects_forward_inputs(kind: str) -> None:
    torch.manual_seed(0)
    module = nn.Linear(24, 16) if kind == "linear" else Conv1D(16, 24)  # Conv1D(out, in)
    acc = HessianAccumulator(24)
    handle = acc.hook(module)
    a, b = torch.randn(2, 5, 24), torch.randn(3, 24)
    with torch.no_grad():
        module(a)
        module(b)
    handle.remove()
    with torch.no_grad():
        module(torch.randn(4, 24))  # after removal nothing is collected
    assert acc.n_tokens == 13
    torch.testing.assert_close(acc.hessian, hessian_of(torch.cat([a.reshape(-1, 24), b])))
