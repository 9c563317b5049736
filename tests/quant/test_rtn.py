"""Round-to-nearest quantization against a naive per-group reference, plus its numerical guarantees."""

from __future__ import annotations

import pytest
import torch

from layerwise.core.bitstream import words_per_row
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.quant import QUANTIZERS, group_params, quantize_codes, quantize_rtn, unpack

BITS = (2, 3, 4, 8)
# (in_features, group_size): full groups, and 576 = 4*128 + 64, a partial last group.
SHAPES = ((256, 32), (256, 64), (256, 128), (576, 128), (100, 32))


def reference_fake_quant(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized weight and fp16 scales, one group at a time, straight from the stated convention."""
    weight = weight.to(torch.float32)
    out = torch.empty_like(weight)
    scales = []
    maxq = 2**bits - 1
    for start in range(0, weight.shape[1], group_size):
        group = weight[:, start : start + group_size]
        if sym:
            scale = group.abs().max(dim=1).values * 2 / maxq
        else:
            low = torch.minimum(group.min(dim=1).values, torch.zeros(()))
            high = torch.maximum(group.max(dim=1).values, torch.zeros(()))
            scale = (high - low) / maxq
        scale[scale == 0] = 1.0
        scale = scale.half().float()  # the stored scale is what the codes must be nearest for
        zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-low / scale)
        q = torch.clamp(torch.round(group / scale[:, None]) + zero[:, None], 0, maxq)
        out[:, start : start + group_size] = (q - zero[:, None]) * scale[:, None]
        scales.append(scale)
    return out, torch.stack(scales, dim=1).half()


def random_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Rows of different magnitudes and a few outliers, as in real LLM weights.
    w = torch.randn(out_features, in_features, generator=gen) * 0.02
    w *= torch.logspace(-1, 1, out_features)[:, None]
    w[0, 3] = 0.5
    return w


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", (False, True))
@pytest.mark.parametrize(("in_features", "group_size"), SHAPES)
def test_matches_naive_reference(bits: int, sym: bool, in_features: int, group_size: int) -> None:
    weight = random_weight(24, in_features, seed=bits * 100 + in_features + group_size)
    spec = QuantSpec(bits, group_size, "rtn", sym)
    qw = quantize_rtn(weight, spec)
    expected, expected_scales = reference_fake_quant(weight, bits, group_size, sym)
    n_groups = -(-in_features // group_size)
    assert qw.scales.shape == (24, n_groups) and qw.scales.dtype == torch.float16
    assert (qw.zeros is None) == sym
    if not sym:
        assert qw.zeros.shape == (words_per_row(24, bits), n_groups) and qw.zeros.dtype == torch.int32
    torch.testing.assert_close(qw.scales, expected_scales, rtol=0, atol=0)
    torch.testing.assert_close(qw.dequantize(), expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("sym", (False, True))
def test_error_shrinks_with_bits(sym: bool) -> None:
    weight = random_weight(64, 576, seed=3)
    errors = []
    for bits in BITS:
        deq = quantize_rtn(weight, QuantSpec(bits, 128, "rtn", sym)).dequantize()
        errors.append(float(torch.linalg.matrix_norm(weight - deq) / torch.linalg.matrix_norm(weight)))
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)
    assert errors[-1] < 1e-2


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", (False, True))
def test_error_at_most_half_a_step(bits: int, sym: bool) -> None:
    """Every weight is within half a grid step, plus the drift of the fp16-rounded scale at the grid ends."""
    weight = random_weight(16, 576, seed=bits)
    qw = quantize_rtn(weight, QuantSpec(bits, 128, "rtn", sym))
    step = qw.scales.float().repeat_interleave(128, dim=1)[:, :576]
    bound = step * (0.5 + 2**bits * 2**-11) * (1 + 1e-6)
    assert torch.all((weight - qw.dequantize()).abs() <= bound)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", (False, True))
def test_zero_and_constant_groups(bits: int, sym: bool) -> None:
    weight = random_weight(4, 128, seed=11)
    weight[:, :32] = 0.0  # an all-zero group
    weight[:, 32:64] = 0.37  # constant groups, positive and negative
    weight[:, 64:96] = -1.5
    weight[1, 96:] = 1e-12  # a group whose scale underflows fp16
    qw = quantize_rtn(weight, QuantSpec(bits, 32, "rtn", sym))
    deq = qw.dequantize()
    assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[:, :32], torch.zeros(4, 32))
    # A constant group is one value: within half a step of it (exactly it when asymmetric).
    for cols, value in ((slice(32, 64), 0.37), (slice(64, 96), -1.5)):
        err = (deq[:, cols] - value).abs().max()
        step = qw.scales[:, cols.start // 32].float().max()
        assert err <= (1e-3 * abs(value) if not sym else 0.5 * step + 1e-3 * abs(value))
    assert deq[1, 96:].abs().max() < 1e-6


@pytest.mark.parametrize("sym", (False, True))
def test_exact_zeros_stay_zero(sym: bool) -> None:
    """0 is always a grid point, so pruned / sparse weights survive quantization exactly."""
    weight = random_weight(8, 256, seed=5)
    weight[:, ::3] = 0.0
    deq = quantize_rtn(weight, QuantSpec(4, 64, "rtn", sym)).dequantize()
    assert torch.equal(deq[:, ::3], torch.zeros_like(deq[:, ::3]))


def test_column_wise_helpers_reproduce_rtn_codes() -> None:
    """GPTQ quantizes one column at a time with `group_params` + `quantize_codes`; that must equal RTN."""
    weight = random_weight(12, 200, seed=9)
    for sym in (False, True):
        spec = QuantSpec(3, 64, "rtn", sym)
        codes = unpack(quantize_rtn(weight, spec).qweight, 3, 200)
        for start in range(0, 200, 64):
            scale, zero = group_params(weight[:, start : start + 64], 3, sym)
            assert scale.shape == zero.shape == (12,)
            for col in range(start, min(start + 64, 200)):
                column = quantize_codes(weight[:, col], scale, zero, 3)
                assert torch.equal(column, codes[:, col].to(torch.int32))


def test_codes_use_full_range_and_input_dtype_does_not_matter() -> None:
    weight = random_weight(32, 256, seed=2)
    spec = QuantSpec(4, 128)
    codes = unpack(quantize_rtn(weight, spec).qweight, 4, 256)
    assert int(codes.min()) == 0 and int(codes.max()) == 15
    half = quantize_rtn(weight.half(), spec).dequantize()
    torch.testing.assert_close(half, quantize_rtn(weight.half().float(), spec).dequantize(), rtol=0, atol=0)


def test_registered_and_refuses_bad_weights() -> None:
    assert QUANTIZERS.get("rtn").name == "rtn"
    weight = torch.randn(4, 64)
    assert torch.equal(QUANTIZERS.get("rtn")().quantize(weight, QuantSpec(4, 32)).qweight,
                       quantize_rtn(weight, QuantSpec(4, 32)).qweight)
    with pytest.raises(LayerwiseError, match="unknown quantization method"):
        QUANTIZERS.get("no-such-method")
    bad = torch.randn(4, 64)
    bad[1, 2] = float("nan")
    with pytest.raises(LayerwiseError, match="NaN"):
        quantize_rtn(bad, QuantSpec(4, 32))
    with pytest.raises(LayerwiseError, match="2-D"):
        quantize_rtn(torch.randn(64), QuantSpec(4, 32))
