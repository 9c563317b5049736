"""Memory-bounded quantization: working a few rows at a time gives exactly the values of one pass.

RTN, packing, dequantizing and GPTQ's permutations run in row chunks of `packing.CHUNK_ELEMENTS` values
so that their temporaries stay small on 7B-sized weights; these tests shrink the chunk so that every
path splits (with a short last chunk) and compare bit for bit with a single chunk.
"""

from __future__ import annotations

import pytest
import torch

from layerwise.core import bitstream as packing
from layerwise.core.types import QuantSpec
from layerwise.quant import QuantLinear, quantize_gptq_shared, quantize_rtn, relative_error, squared_norm
from layerwise.quant.quantized import all_finite


def _outputs(weights: list[torch.Tensor], hessian: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for bits, sym, group in [(3, False, 32), (4, True, 16), (8, False, 0)]:
        spec = QuantSpec(bits=bits, group_size=group or weights[0].shape[1], sym=sym, method="rtn")
        qw = quantize_rtn(weights[0], spec)
        error = relative_error(weights[0], QuantLinear.from_quantized(qw, None))
        out += [qw.qweight, qw.scales, qw.dequantize(), torch.tensor(error)]
    for act_order in (True, False):
        specs = [QuantSpec(bits=3, group_size=16, sym=False, method="gptq"),
                 QuantSpec(bits=4, group_size=16 if not act_order else 32, sym=True, method="gptq")]
        for qw in quantize_gptq_shared([w.clone() for w in weights], specs, hessian, act_order=act_order):
            out += [qw.qweight, qw.scales]
    return out


def test_row_chunks_do_not_change_results(monkeypatch):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(45, 70, generator=g), torch.randn(13, 70, generator=g)]
    x = torch.randn(90, 70, generator=g)
    x[:, 5] = 0  # a dead input
    hessian = 2 * x.T @ x / x.shape[0]
    whole = _outputs(weights, hessian)
    monkeypatch.setattr(packing, "CHUNK_ELEMENTS", 150)  # two rows a chunk, odd row counts
    chunked = _outputs(weights, hessian)
    assert len(packing.row_chunks(45, 70)) == 23
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)


def test_squared_norm_and_all_finite():
    w = torch.randn(300, 200, dtype=torch.float64)
    assert squared_norm(w) == float(w.double().pow(2).sum())
    assert torch.equal(w, w.clone())  # not squared in place
    assert all_finite(w) and all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        v = w.clone()
        v[299, 199] = bad
        assert not all_finite(v, chunk=1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_is_not_fooled_by_a_sum_that_overflows(dtype):
    """Finite values whose sum overflows are finite; one NaN or Inf among them is found (each piece's sum is
    checked first, the values themselves when the sum is not finite)."""
    large = torch.finfo(dtype).max / 2
    w = torch.full((4000,), large, dtype=dtype)
    assert all_finite(w, chunk=1000)
    for bad in (float("nan"), float("inf"), float("-inf")):
        v = w.clone()
        v[2500] = bad
        assert not all_finite(v, chunk=1000)
    mixed = torch.tensor([float("inf"), float("-inf")], dtype=dtype)  # a sum of NaN: still refused
    assert not all_finite(mixed)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_in_chunks_round_trips(monkeypatch, bits):
    codes = torch.randint(0, 2**bits, (37, 53), dtype=torch.int32)
    whole = packing.pack(codes, bits)
    monkeypatch.setattr(packing, "CHUNK_ELEMENTS", 53 * 5)
    assert torch.equal(packing.pack(codes, bits), whole)
    assert torch.equal(packing.unpack(whole, bits, 53).to(torch.int32), codes)
