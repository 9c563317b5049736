"""Triton dequant-matmul kernels against the torch reference, run by the Triton interpreter on CPU.

conftest sets TRITON_INTERPRET=1 before anything imports Triton, so these tests run the kernels' own
code (masks, 3-bit extraction, split-K, group handling) without a GPU; speed is for benchmarks/kernels.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import random_windows, tiny_model

import layerwise
from layerwise.core.bitstream import pack_zeros
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.kernels import KERNEL_ENV, torch_ref, triton_matmul
from layerwise.quant import QuantLinear, pack

pytest.importorskip("triton")

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
# (out, in): 40 and 70 are not multiples of the 64-wide output tile; 200 is no multiple of any group (a
# short last group) nor of the K tile; 256 is whole groups. Every 3-bit row has straddling codes.
SHAPES = ((40, 200), (70, 256))
# Max |kernel - reference| over max |reference|. The weights are bit-identical (test_weights_are_exact)
# and both sides accumulate in float32, so what is left is summation order plus the final rounding to
# x's dtype: about one unit in the last place of the largest output (fp16 2**-10, bf16 2**-7).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def packed_weight(bits: int, group: int, sym: bool, out_f: int, in_f: int, seed: int = 0):
    """Random codes packed as bitstream-v1, fp16 scales, packed integer zeros (None when symmetric)."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = -(-in_f // group)
    qweight = pack(torch.randint(0, 2**bits, (out_f, in_f), generator=gen), bits)
    scales = (0.01 + 0.1 * torch.rand(out_f, n_groups, generator=gen)).half()
    zeros = None if sym else pack_zeros(torch.randint(0, 2**bits, (out_f, n_groups), generator=gen), bits)
    return qweight, scales, zeros


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def check(bits: int, group: int, sym: bool, m: int, dtype: torch.dtype, shape: tuple[int, int], **kwargs) -> None:
    out_f, in_f = shape
    qweight, scales, zeros = packed_weight(bits, group, sym, out_f, in_f)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, in_f, generator=gen).to(dtype)
    bias = torch.randn(out_f, generator=gen)
    y = triton_matmul.triton_dequant_matmul(x, qweight, scales, zeros, bits, group, in_f, sym, bias, **kwargs)
    ref = torch_ref.dequant_matmul(x, qweight, scales, zeros, bits, group, in_f, sym, bias)
    assert y.dtype == dtype and y.shape == ref.shape
    assert relative_error(y, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("m", (1, 17))  # 1: the split-K GEMV; 17: the first M the tiled GEMM takes
@pytest.mark.parametrize("sym", (False, True))
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_matches_reference(bits: int, group: int, sym: bool, m: int, dtype: torch.dtype, shape) -> None:
    check(bits, group, sym, m, dtype, shape)


@pytest.mark.parametrize("m", (1, 17))
@pytest.mark.parametrize("bits", BITS)
def test_bfloat16(bits: int, m: int) -> None:
    # Runs under the interpreter only because the kernel feeds tl.dot float32 there: the interpreter's
    # own bf16 tl.dot returns garbage (values around 1e10) without any error.
    check(bits, 64, False, m, torch.bfloat16, SHAPES[0])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("variant", "m", "split_k"),
    (("gemv", 1, 1), ("gemv", 16, 3), ("gemv", 5, 16), ("gemm", 1, None), ("gemm", 65, None)),
)
def test_forced_variants(bits: int, variant: str, m: int, split_k: int | None) -> None:
    """Each variant at M it is not chosen for, no split / an uneven split / more splits than K tiles."""
    check(bits, 64, False, m, torch.float32, SHAPES[0], variant=variant, split_k=split_k)


@pytest.mark.parametrize("variant", ("gemv", "gemm"))
@pytest.mark.parametrize("group", (20, 256))
@pytest.mark.parametrize("bits", BITS)
def test_other_group_sizes(bits: int, group: int, variant: str) -> None:
    """Group 20: K tiles cross groups, so scales and zeros are gathered per element. 256 > 200: one group."""
    check(bits, group, False, 3, torch.float16, SHAPES[0], variant=variant)


@pytest.mark.parametrize("sym", (False, True))
@pytest.mark.parametrize("bits", BITS)
def test_weights_are_exact(bits: int, sym: bool) -> None:
    """Rows of the identity pick single weights: every code, straddling or not, decodes bit-exactly."""
    out_f, in_f, group = 40, 100, 32
    qweight, scales, zeros = packed_weight(bits, group, sym, out_f, in_f, seed=bits)
    weight = torch_ref.dequantize(qweight, scales, zeros, bits, group, in_f, sym)
    eye = torch.eye(in_f)
    y = triton_matmul.triton_dequant_matmul(eye, qweight, scales, zeros, bits, group, in_f, sym)
    torch.testing.assert_close(y, weight.T, rtol=0, atol=0)
    y16 = triton_matmul.triton_dequant_matmul(eye[:16], qweight, scales, zeros, bits, group, in_f, sym)
    torch.testing.assert_close(y16, weight.T[:16], rtol=0, atol=0)


def test_leading_dims_and_no_bias() -> None:
    qweight, scales, zeros = packed_weight(4, 32, False, 40, 200)
    x = torch.randn(2, 3, 200, dtype=torch.float16)
    y = triton_matmul.triton_dequant_matmul(x, qweight, scales, zeros, 4, 32, 200, False)
    ref = torch_ref.dequant_matmul(x, qweight, scales, zeros, 4, 32, 200, False)
    assert y.shape == (2, 3, 40)
    assert relative_error(y, ref) <= TOLERANCE[torch.float16]
    assert triton_matmul.triton_dequant_matmul(x[:0], qweight, scales, zeros, 4, 32, 200, False).shape == (0, 3, 40)


def test_refuses_mismatched_buffers() -> None:
    qweight, scales, zeros = packed_weight(3, 32, False, 40, 200)
    x = torch.randn(1, 200)
    with pytest.raises(LayerwiseError, match="qweight"):
        triton_matmul.triton_dequant_matmul(x, qweight[:, :-1], scales, zeros, 3, 32, 200, False)
    with pytest.raises(LayerwiseError, match="zeros"):
        triton_matmul.triton_dequant_matmul(x, qweight, scales, None, 3, 32, 200, False)
    with pytest.raises(LayerwiseError, match="features"):
        triton_matmul.triton_dequant_matmul(x[:, :100], qweight, scales, zeros, 3, 32, 200, False)
    with pytest.raises(LayerwiseError, match="at most 16 rows"):
        triton_matmul.triton_dequant_matmul(torch.randn(17, 200), qweight, scales, zeros, 3, 32, 200, False,
                                            variant="gemv")


def test_dispatch_picks_torch_on_cpu_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    x = torch.randn(2, 64)
    assert not triton_matmul.use_triton(x, 4)
    module = QuantLinear(64, 32, QuantSpec(4, 32))

    def fail(*args, **kwargs):
        raise AssertionError("the Triton kernel ran for a CPU tensor")

    monkeypatch.setattr(triton_matmul, "triton_dequant_matmul", fail)
    module(x)


def test_dispatch_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_like = SimpleNamespace(is_cuda=True, dtype=torch.float16, requires_grad=False)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert triton_matmul.use_triton(cuda_like, 3)  # type: ignore[arg-type]
    monkeypatch.setenv(KERNEL_ENV, "torch")
    assert not triton_matmul.use_triton(cuda_like, 3)  # type: ignore[arg-type]
    monkeypatch.setenv(KERNEL_ENV, "triton")
    assert triton_matmul.use_triton(torch.randn(2, 8), 2)
    # No backward in the kernel, and no kernel for other dtypes: those always take the torch path.
    assert not triton_matmul.use_triton(torch.randn(2, 8, requires_grad=True), 2)
    assert not triton_matmul.use_triton(torch.randn(2, 8, dtype=torch.float64), 2)
    monkeypatch.setenv(KERNEL_ENV, "cuda")
    with pytest.raises(LayerwiseError, match=KERNEL_ENV):
        triton_matmul.use_triton(torch.randn(2, 8), 2)


def test_quantized_model_generates_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny llama compressed to 4 bits decodes the same tokens through the kernel as through torch.

    The 20-token prompt runs the GEMM (M = 20), each new token the split-K GEMV (M = 1).
    """
    model = tiny_model("llama", n_layers=2)
    layerwise.compress(model, uniform=4, group_size=32, method="rtn", calib=random_windows(2, 16), progress=False)
    prompt = random_windows(1, 20, seed=3)

    def generate() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)

    monkeypatch.setenv(KERNEL_ENV, "torch")
    expected = generate()
    calls = []
    kernel = triton_matmul.triton_dequant_matmul

    def counting(*args, **kwargs):
        calls.append(args[0].shape[:-1].numel())
        return kernel(*args, **kwargs)

    monkeypatch.setattr(triton_matmul, "triton_dequant_matmul", counting)
    monkeypatch.setenv(KERNEL_ENV, "triton")
    torch.testing.assert_close(generate(), expected, rtol=0, atol=0)
    assert 20 in calls and 1 in calls


# The interpreter runs Python, so it cannot catch what only Triton's compiler rejects; this compiles both
# variants (the 3-bit, gathered-group, bias path: the most code) to an sm_90 cubin, which needs no GPU.
COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from layerwise.kernels import triton_gemm, triton_gemv

flags = dict(BITS=3, SYM=False, GROUP_PER_TILE=False, HAS_BIAS=True, DOT_PRECISION="native", BLOCK_K=32)
for fn, consts in ((triton_gemv._gemv_kernel, dict(BLOCK_M=16, BLOCK_N=64)),
                   (triton_gemm._gemm_kernel, dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8))):
    consts.update(flags)
    types = {"q_ptr": "*i32", "z_ptr": "*i32", "out_ptr": "*fp32"}
    signature = {a: "constexpr" if a in consts else types.get(a, "*fp16" if a.endswith("_ptr") else "i32")
                 for a in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
"""


def test_kernels_compile_for_a_gpu() -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")  # build JIT kernels, not interpreted ones
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("sym", (False, True))
def test_kernels_read_the_compressed_tensors_export_as_written(tmp_path, sym):
    """The tensors a compressed-tensors export writes (weight_packed, weight_zero_point, weight_scale), read
    back from its safetensors file and handed to the kernel unchanged, give the module's own outputs: the
    kernel's layout is the export's, 3-bit packed densely and zero points down the output dimension."""
    import safetensors.torch

    from layerwise.core.types import LayerAction, Plan
    from layerwise.output.export import export_checkpoint

    plan = Plan([LayerAction(0, "quantize", 3, 32, "rtn", sym=sym), LayerAction(1, "quantize", 2, 64, "rtn", sym=sym)])
    result = layerwise.apply(tiny_model("llama", n_layers=2), plan, "rtn", progress=False)
    layerwise.save(result, tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "ct", "compressed-tensors")
    stored = safetensors.torch.load_file(tmp_path / "ct" / "model.safetensors")
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    for name, module in result.model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        zeros = None if sym else stored[f"{name}.weight_zero_point"]
        y = triton_matmul.triton_dequant_matmul(
            x[:, : module.in_features].contiguous(), stored[f"{name}.weight_packed"],
            stored[f"{name}.weight_scale"].to(torch.float16), zeros, module.bits, module.group_size,
            module.in_features, sym)
        with torch.no_grad():
            expected = torch_ref.dequant_matmul(x[:, : module.in_features], module.qweight, module.scales,
                                                module.zeros, module.bits, module.group_size, module.in_features,
                                                sym)
        assert relative_error(y, expected) <= TOLERANCE[torch.float32], name
