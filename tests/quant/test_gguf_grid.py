"""GGUF grids: the bytes layerwise writes for every llama.cpp type decode, by the `gguf` package's own
dequantizer (the oracle), to exactly the weights layerwise computed them for."""

from __future__ import annotations

import pytest
import torch

from layerwise.core.gguf_types import FALLBACKS, GGUF_TYPES, fitted_gguf_type
from layerwise.quant.gguf_grid import dequantize_blocks, gguf_grid, pack_blocks


def weights(rows: int = 6, width: int = 512, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(rows, width) * 0.05
    w[0, :32] = 0.0  # a block of zeros: a zero scale must still decode to zeros
    w[1, 40:60] *= 20.0  # outliers
    w[2] = w[2].abs()  # no negative weights: the min of a type with mins is 0
    return w


@pytest.mark.parametrize("name", sorted(GGUF_TYPES))
def test_packed_blocks_decode_exactly_to_the_grid(name):
    kind = GGUF_TYPES[name]
    w = weights()
    grid = gguf_grid(w, kind)
    codes = grid.codes(w)
    assert int(codes.min()) >= kind.cmin and int(codes.max()) <= kind.cmax
    data = pack_blocks(grid, codes)
    assert data.dtype == torch.uint8 and data.shape == (6, 512 // kind.block * kind.nbytes)
    ours = grid.dequantize(codes)
    assert torch.equal(dequantize_blocks(data, kind, 512), ours)
    assert torch.equal(ours[0, :32], torch.zeros(32))
    # Round to nearest on a range grid: every weight is within a step of its value (the step of an outlier's
    # sub-block); a coarse sanity bound on the whole weight's error.
    assert float((ours - w).norm() / w.norm()) < {2: 0.45, 3: 0.2, 4: 0.12, 5: 0.06, 6: 0.03, 8: 0.01}[kind.bits]


@pytest.mark.parametrize("name", sorted(GGUF_TYPES))
def test_every_code_round_trips_through_the_bytes(name):
    """Random codes over the whole range (not only those rounding picks) survive packing: each bit position of
    each layout is exercised."""
    kind = GGUF_TYPES[name]
    w = weights(seed=1)
    grid = gguf_grid(w, kind)
    codes = torch.randint(kind.cmin, kind.cmax + 1, w.shape, generator=torch.Generator().manual_seed(2),
                          dtype=torch.int32)
    decoded = dequantize_blocks(pack_blocks(grid, codes), kind, 512)
    assert torch.equal(decoded, grid.dequantize(codes))


def test_bits_per_weight_are_llama_cpps():
    assert {n: t.bits_per_weight for n, t in GGUF_TYPES.items() if n.endswith("_k")} == {
        "q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}
    assert GGUF_TYPES["q4_0"].bits_per_weight == 4.5 and GGUF_TYPES["q8_0"].bits_per_weight == 8.5


def test_rows_that_are_not_whole_super_blocks_fall_back_as_llama_cpp_does():
    assert fitted_gguf_type("q4_k", 1536) == "q4_k"
    assert {name: fitted_gguf_type(name, 576) for name in FALLBACKS} == {
        "q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
    assert fitted_gguf_type("q4_0", 576) == "q4_0"
    assert fitted_gguf_type("q4_k", 100) is None and fitted_gguf_type("q8_0", 48) is None


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q6_k", "q4_0", "q4_1", "q5_k"])
@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_gptq_on_a_gguf_grid_keeps_the_grid_and_lowers_the_output_error(name, method):
    """GPTQ (and GPTAQ, given no separate reference inputs) choose other codes than rounding, on the same
    fixed grid: every weight still decodes to a point of `gguf_grid`'s grid, and the layer's output error on
    the calibration inputs is lower than round-to-nearest's."""
    from layerwise.core.types import QuantSpec
    from layerwise.quant import quantize_module

    generator = torch.Generator().manual_seed(3)
    mix = torch.randn(512, 512, generator=generator) / 512**0.5 + torch.eye(512)
    x = torch.randn(2048, 512, generator=generator) @ mix  # correlated inputs: where GPTQ helps
    w = weights(rows=16, seed=4)
    linear = torch.nn.Linear(512, 16, bias=False)
    linear.weight.data.copy_(w)
    hessian = 2 / x.shape[0] * x.T @ x
    kind = GGUF_TYPES[name]
    gptq = quantize_module(linear, QuantSpec.of_gguf(name, method), hessian)
    rtn = quantize_module(linear, QuantSpec.of_gguf(name, "rtn"))
    assert gptq.qweight.dtype == torch.uint8 and gptq.spec.gguf == name
    deq = gptq.dequantize()
    grid = gguf_grid(w, kind)
    assert torch.equal(grid.dequantize(grid.codes(deq)), deq)
    assert not torch.equal(deq, rtn.dequantize())

    def output_error(module):
        return float(((x @ (w - module.dequantize()).T) ** 2).sum())

    assert output_error(gptq) < output_error(rtn)
