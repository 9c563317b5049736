"""The bitstream-v1 packed format: exact round trips, the documented bit layout, shapes and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.core.errors import LayerwiseError
from layerwise.quant import PackFormat, pack, unpack

BITS = (2, 3, 4, 8)
# Widths that are and are not multiples of 32 and of the codes-per-word (16, 10.67, 8, 4).
IN_FEATURES = (1, 3, 7, 10, 11, 31, 32, 33, 64, 65, 96, 100, 576)


def naive_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The layout as the module docstring states it, with Python integers as the bitstream."""
    n_words = math.ceil(codes.shape[1] * bits / 32)
    rows = []
    for row in codes.tolist():
        stream = 0
        for k, code in enumerate(row):
            stream |= code << (k * bits)
        words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
        rows.append([w - 2**32 if w >= 2**31 else w for w in words])
    return torch.tensor(rows, dtype=torch.int32).reshape(codes.shape[0], n_words)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("in_features", IN_FEATURES)
def test_round_trip_random_codes(bits: int, in_features: int) -> None:
    gen = torch.Generator().manual_seed(1000 * bits + in_features)
    codes = torch.randint(0, 2**bits, (5, in_features), generator=gen)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, math.ceil(in_features * bits / 32))
    out = unpack(packed, bits, in_features)
    assert out.dtype == torch.uint8
    assert torch.equal(out.to(torch.int64), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("in_features", (1, 11, 33, 100))
def test_round_trip_extremes(bits: int, in_features: int) -> None:
    """All-max codes set every data bit (and bit 31 of full words); all-zero codes set none."""
    for fill in (0, 2**bits - 1):
        codes = torch.full((3, in_features), fill, dtype=torch.int64)
        assert torch.equal(unpack(pack(codes, bits), bits, in_features).to(torch.int64), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("in_features", (5, 32, 33, 100))
def test_layout_matches_documented_bitstream(bits: int, in_features: int) -> None:
    gen = torch.Generator().manual_seed(bits + 7 * in_features)
    codes = torch.randint(0, 2**bits, (4, in_features), generator=gen)
    codes[0] = 2**bits - 1
    assert torch.equal(pack(codes, bits), naive_pack(codes, bits))


def test_three_bit_codes_straddle_and_32_codes_fill_three_words() -> None:
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10] = 0b111  # bits 30..32: two bits in word 0, one in word 1
    packed = pack(codes, 3)
    assert packed.shape == (1, 3)
    as_unsigned = [w & 0xFFFFFFFF for w in packed[0].tolist()]
    assert as_unsigned == [0b11 << 30, 0b1, 0]


@pytest.mark.parametrize("bits", BITS)
def test_padding_bits_are_zero(bits: int) -> None:
    in_features = 5
    codes = torch.full((2, in_features), 2**bits - 1, dtype=torch.int64)
    last = pack(codes, bits)[:, -1].to(torch.int64) & 0xFFFFFFFF
    used = in_features * bits - 32 * (math.ceil(in_features * bits / 32) - 1)
    assert torch.all(last >> used == 0)


def test_accepts_any_integer_dtype() -> None:
    codes = torch.randint(0, 16, (3, 40))
    expected = pack(codes, 4)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(pack(codes.to(dtype), 4), expected)


def test_refuses_bad_input() -> None:
    with pytest.raises(LayerwiseError, match="must lie in"):
        pack(torch.tensor([[0, 8]]), 3)
    with pytest.raises(LayerwiseError, match="must lie in"):
        pack(torch.tensor([[-1, 0]]), 4)
    with pytest.raises(LayerwiseError, match="unpack|pack"):
        pack(torch.zeros(2, 2, dtype=torch.int64), 5)
    with pytest.raises(LayerwiseError, match="integer"):
        pack(torch.zeros(2, 2), 4)
    with pytest.raises(LayerwiseError, match="words"):
        unpack(torch.zeros(2, 3, dtype=torch.int32), 4, 8)


def test_format_name() -> None:
    assert PackFormat.BITSTREAM == "bitstream-v1"
    assert PackFormat("bitstream-v1") is PackFormat.BITSTREAM
