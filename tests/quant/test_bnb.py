"""bitsandbytes formats (nf4, int8): bit-exact agreement with bitsandbytes, QuantLinear, checkpoints, budgets."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import random_windows, tiny_model
from torch import nn

import layerwise
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerAction, Plan, QuantSpec
from layerwise.quant import QUANTIZERS, QuantizedWeight, QuantLinear, quantize_module, quantize_rtn
from layerwise.quant.bnb import quantize_int8, quantize_nf4

# layerwise imports bitsandbytes only when it quantizes or dequantizes, so the imports above always work.
bnbf = pytest.importorskip(
    "bitsandbytes.functional", reason="bitsandbytes is not installed; `pip install bitsandbytes` to test nf4 / int8"
)

NF4 = QuantSpec(4, 64, "nf4")
INT8 = QuantSpec(8, 128, "int8")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def _bnb_nf4_reference(qweight: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], block: int) -> torch.Tensor:
    """bitsandbytes' own dequantization of stored nf4 tensors, as a bnb user would rebuild them."""
    state = bnbf.QuantState(
        absmax=absmax, shape=torch.Size(shape), dtype=torch.float32, blocksize=block,
        code=bnbf.get_4bit_type("nf4", device="cpu"), quant_type="nf4",
    )
    return bnbf.dequantize_4bit(qweight, state)


@pytest.mark.parametrize(
    ("shape", "block"),
    [((48, 128), 64), ((24, 96), 64), ((40, 64), 128), ((6, 100), 256), ((7, 9), 64)],
    ids=["aligned", "blocks-cross-rows", "two-rows-a-block", "short-last-block", "odd-count"],
)
def test_nf4_stores_exactly_what_bitsandbytes_makes(shape, block):
    weight = _weight(*shape)
    qw = quantize_nf4(weight, QuantSpec(4, block, "nf4"))
    packed, state = bnbf.quantize_4bit(weight, blocksize=block, quant_type="nf4")
    assert qw.format == "bnb-nf4" and qw.zeros is None
    assert qw.qweight.dtype == torch.uint8 and torch.equal(qw.qweight, packed)
    assert qw.scales.dtype == torch.float32 and torch.equal(qw.scales, state.absmax)
    n = shape[0] * shape[1]
    if n % 2 == 0:  # an odd count sends bitsandbytes' CPU path to torch.compile; too slow for a unit test
        # bitsandbytes on the flattened weight is the reference every backend agrees on.
        flat = _bnb_nf4_reference(qw.qweight, qw.scales, (n,), block).view(shape)
        assert torch.equal(qw.dequantize(), flat)
    if shape[1] % block == 0:  # whole blocks per row: the natural 2-D state works too
        assert torch.equal(qw.dequantize(), _bnb_nf4_reference(qw.qweight, qw.scales, shape, block))
    error = (qw.dequantize() - weight).norm() / weight.norm()
    assert error < 0.12  # NF4 on Gaussian weights: about 0.09


def test_int8_stores_exactly_what_bitsandbytes_makes():
    weight = _weight(40, 96)
    weight[3] = 0  # an all-zero row: absmax 0, codes 0
    qw = quantize_int8(weight, INT8)
    # As bitsandbytes' Int8Params does it: from the fp16 weight (its CUDA kernel takes only fp16).
    codes, absmax, _ = bnbf.int8_vectorwise_quant(weight.half())
    assert qw.format == "bnb-int8-rowwise" and qw.zeros is None
    assert qw.qweight.dtype == torch.int8 and qw.scales.dtype == torch.float32 and qw.scales.shape == (40,)
    assert torch.equal(qw.scales, absmax)
    assert torch.equal(qw.qweight[torch.arange(40) != 3], codes[torch.arange(40) != 3])
    assert not qw.qweight[3].any()
    deq = qw.dequantize()
    assert torch.equal(deq, bnbf.int8_vectorwise_dequant(qw.qweight, qw.scales))
    assert not deq[3].any()
    assert (deq - weight).norm() / weight.norm() < 0.01
    # A bf16 weight gives what its (exact) fp32 copy gives; one beyond fp16's range is refused.
    half = weight.to(torch.bfloat16)
    assert torch.equal(quantize_int8(half, INT8).qweight, quantize_int8(half.float(), INT8).qweight)
    with pytest.raises(LayerwiseError, match="float16"):
        quantize_int8(weight * 1e5, INT8)


@pytest.mark.parametrize("spec", [NF4, INT8, QuantSpec(4, 128, "nf4")], ids=lambda s: s.label())
def test_quantlinear_forward_and_empty_reload(spec):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    qlinear = quantize_module(linear, spec)
    assert qlinear.format == QUANTIZERS.get(spec.method)().quantize(linear.weight, spec).format
    x = torch.randn(2, 5, 96)
    deq = qlinear.dequantize()
    torch.testing.assert_close(qlinear(x), x @ deq.T + linear.bias, rtol=1e-6, atol=1e-6)
    assert qlinear(x.to(torch.bfloat16)).dtype == torch.bfloat16

    state = qlinear.state_dict()
    assert set(state) == {"qweight", "scales", "bias"}
    empty = QuantLinear.empty(96, 40, spec, bias=True)
    for name in ("qweight", "scales"):
        assert (empty.get_buffer(name).shape, empty.get_buffer(name).dtype) == (state[name].shape, state[name].dtype)
    empty.load_state_dict(state)
    assert torch.equal(empty(x), qlinear(x))
    # A whole-model dtype cast must not touch the stored format.
    empty.to(torch.bfloat16)
    assert empty.qweight.dtype == state["qweight"].dtype and empty.scales.dtype == torch.float32


def test_stored_tensors_are_checked():
    qw = quantize_nf4(_weight(8, 64), NF4)
    with pytest.raises(LayerwiseError, match="qweight must be uint8"):
        QuantizedWeight(qw.qweight.to(torch.int32), qw.scales, None, NF4, 8, 64)
    with pytest.raises(LayerwiseError, match="stores no zeros"):
        QuantizedWeight(qw.qweight, qw.scales, qw.scales, NF4, 8, 64)
    with pytest.raises(LayerwiseError, match="stores format"):
        QuantizedWeight(qw.qweight, qw.scales, None, NF4, 8, 64, format="bitstream-v1")


def test_mixed_int8_nf4_plan_saves_and_reloads(tmp_path):
    model = tiny_model("llama")
    layers = [
        LayerAction(0, "quantize", 8, 128, "int8"),
        LayerAction(1, "quantize", 4, 64, "nf4"),
        # Blocks of 128 span two 64-wide rows; down_proj (64x128) gets blocks of 256.
        LayerAction(2, "quantize", 4, 128, "nf4", overrides={"mlp.down_proj": QuantSpec(4, 256, "nf4")}),
        LayerAction(3, "quantize", 8, 128, "int8"),
    ]
    plan = Plan(layers)
    windows = random_windows()
    with torch.no_grad():
        before = model(windows).logits
    result = layerwise.apply(model, plan, progress=False)
    formats = {name.split(".")[2]: m.format for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert formats == {"0": "bnb-int8-rowwise", "1": "bnb-nf4", "2": "bnb-nf4", "3": "bnb-int8-rowwise"}
    with torch.no_grad():
        after = model(windows).logits
    assert 0 < (after - before).norm() / before.norm() < 0.2

    layerwise.save(result, tmp_path / "ckpt")
    ckpt = layerwise.load(tmp_path / "ckpt")
    with torch.no_grad():
        reloaded = ckpt.model(windows).logits
    assert torch.equal(reloaded, after)
    down = ckpt.model.model.layers[2].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.group_size == 256 and down.qweight.dtype == torch.uint8
    assert [a.method for a in ckpt.plan.layers] == ["int8", "nf4", "nf4", "int8"]


def test_storage_bits_count_bitsandbytes_tensors():
    n, k = 576, 1536
    assert QuantSpec(4, 64, "nf4").storage_bits(n, k) == n * k * 4 + 32 * (n * k // 64)  # 4.5 bits a weight
    assert QuantSpec(4, 256, "nf4").storage_bits(n, k) == n * k * 4 + 32 * (n * k // 256)  # 4.125
    assert QuantSpec(4, 64, "nf4").storage_bits(7, 9) == 8 * 32 + 32  # 63 codes fill 32 bytes; one short block
    assert QuantSpec(8, 128, "int8").storage_bits(n, k) == n * (8 * k + 32)
    assert QuantSpec(8, 32, "int8").storage_bits(n, k) == QuantSpec(8, 4096, "int8").storage_bits(n, k)
    # The budget is what is actually stored.
    for spec, shape in [(NF4, (7, 9)), (QuantSpec(4, 128, "nf4"), (40, 96)), (INT8, (40, 96))]:
        qw = QUANTIZERS.get(spec.method)().quantize(_weight(*shape), spec)
        stored = sum(t.numel() * t.element_size() * 8 for t in (qw.qweight, qw.scales))
        assert qw.storage_bits() == stored == spec.storage_bits(*shape)


def test_bad_specs_are_refused():
    with pytest.raises(LayerwiseError, match="'nf4' stores 4-bit codes; set bits to 4, not 3"):
        QuantSpec(3, 64, "nf4")
    with pytest.raises(LayerwiseError, match="'int8' stores 8-bit codes; set bits to 8, not 4"):
        QuantSpec(4, 128, "int8")
    for block in (32, 100, 8192):
        with pytest.raises(LayerwiseError, match="not a bitsandbytes block size; choose one of 64, 128, 256"):
            QuantSpec(4, block, "nf4")
    with pytest.raises(LayerwiseError, match="bits to 4"):
        LayerAction(0, "quantize", 2, 64, "nf4")
    with pytest.raises(LayerwiseError, match="block size"):
        Plan.from_dict({"layers": [{"layer": 0, "action": "quantize", "bits": 4, "group_size": 96, "method": "nf4"}]})
    with pytest.raises(LayerwiseError, match="NaN"):
        quantize_nf4(torch.tensor([[1.0, float("nan")]]), NF4)
    with pytest.raises(LayerwiseError, match="2-D"):
        quantize_int8(torch.ones(4), INT8)
    with pytest.raises(LayerwiseError, match="spec for method 'rtn'"):
        quantize_nf4(_weight(4, 64), QuantSpec(4, 64))
    assert not QUANTIZERS.get("nf4").needs_hessian and not QUANTIZERS.get("int8").needs_hessian


def test_rtn_keeps_its_format():
    qw = quantize_rtn(_weight(8, 64), QuantSpec(4, 32))
    assert qw.format == "bitstream-v1" and qw.qweight.dtype == torch.int32
    assert QuantLinear.empty(64, 8, QuantSpec(4, 32), bias=False).format == "bitstream-v1"


def test_missing_bitsandbytes_names_the_method_and_the_fix(monkeypatch):
    nf4_linear = quantize_module(nn.Linear(64, 8), NF4)
    int8_linear = quantize_module(nn.Linear(64, 8), INT8)
    # None in sys.modules makes `import bitsandbytes...` raise ImportError, as if it were not installed.
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(LayerwiseError, match=r"method 'nf4' needs bitsandbytes.*`pip install bitsandbytes`"):
        quantize_nf4(_weight(8, 64), NF4)
    with pytest.raises(LayerwiseError, match=r"method 'int8' needs bitsandbytes.*`pip install bitsandbytes`"):
        quantize_int8(_weight(8, 64), INT8)
    with pytest.raises(LayerwiseError, match=r"'nf4'.*pip install bitsandbytes"):
        nf4_linear(torch.randn(1, 64))
    with pytest.raises(LayerwiseError, match=r"'int8'.*pip install bitsandbytes"):
        int8_linear.dequantize()
    # Building empty modules (checkpoint loading) needs no bitsandbytes; only the math does.
    assert QuantLinear.empty(64, 8, NF4, bias=False).qweight.shape == (256, 1)


def test_import_layerwise_does_not_import_bitsandbytes():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import layerwise, layerwise.quant, layerwise.output.checkpoint\n"
        "from layerwise.quant import QUANTIZERS\n"
        "assert {'nf4', 'int8'} <= set(QUANTIZERS.names())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
