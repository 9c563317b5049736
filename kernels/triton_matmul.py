"""Fused dequantize-and-multiply Triton kernels for ``bitstream-v1`` weights: ``y = x @ dequant(W)^T (+ bias)``.

`triton_dequant_matmul` has the signature of `torch_ref.dequant_matmul` and computes the same thing, but
reads the packed buffers a `QuantLinear` stores (no repacking, no dense weight in memory): 2, 3, 4 and
8 bits, per-group fp16 scales and packed zero points (asymmetric) or the fixed zero ``2**(bits-1)``
(symmetric), a short last group, fp16 / bf16 / fp32 activations, float32 accumulation, output in x's dtype.

Layout read (`layerwise.core.bitstream`, format ``bitstream-v1``)
---------------------------------------------------------------
``qweight`` is int32 (N, ceil(K*bits/32)), one little-endian bit stream per output row: code ``k`` of
row ``n`` occupies stream bits ``[k*bits, (k+1)*bits)``, stream bit ``i`` being bit ``i % 32`` of word
``i // 32``. ``scales`` are fp16 (N, G), G = ceil(K/group_size); code ``k`` uses group
``k // group_size``. ``zeros`` are int32 (ceil(N*bits/32), G): column g is a ``bitstream-v1`` stream of the
N rows' zero points (`layerwise.core.bitstream.pack_zeros`, compressed-tensors' ``weight_zero_point``
layout), read with the same extraction as the codes, one word row per 32 bits. The weight is
``(q - zero) * scale`` evaluated in float32 and rounded once to x's dtype, exactly as the reference does.

Code extraction (per element of a weight tile)::

    bit   = k * bits
    word  = bit >> 5                      # which int32 of the row
    shift = bit & 31                      # where the code starts in it
    q     = (uint32(qweight[n, word]) >> shift)
    if shift > 32 - bits:                 # 3 bits only: the code straddles into the next word
        q |= uint32(qweight[n, word + 1]) << (32 - shift)
    q &= 2**bits - 1

For 2, 4 and 8 bits ``32 % bits == 0``, no code straddles, and the second read is compiled out. For 3
bits 32 codes fill exactly 3 words and codes 10 and 21 of each block straddle; the next word exists
whenever a valid code straddles, because each row's stream is padded to whole words. Words are
reinterpreted as uint32 so that ``>>`` is a logical shift. Neighbouring codes share a word, so the
per-element loads repeat addresses (as in gemlite's kernels) that the cache serves: memory traffic is
the packed bytes, once.

Variants and dispatch
---------------------
* M (= batch x tokens) <= 16 (`triton_gemv.MAX_M`): split-K "GEMV". 16 is the smallest M a ``tl.dot``
  takes, so one program covers all rows and every weight byte is read once; K is split so that a layer
  with few output tiles still fills the GPU. This is the decode path.
* M > 16: a tiled GEMM (`triton_gemm`), 64x64 tiles up to M = 64 and 128x128 above.

One fixed configuration per variant, no autotuning: autotuning over several configs fails under the
Triton interpreter, which is how these kernels are tested on CPU, and it is a per-shape cost at first
call. K tiles are picked to divide the group size when they can (then a tile reads one scale and zero
per row); other group sizes gather a scale per element. The tile shapes are reasonable defaults for an
H100-class GPU and are not tuned by measurement.

`use_triton` decides per call; `BitstreamCodec.matmul` asks it, so each module picks by its own bit
width. The environment variable ``LAYERWISE_KERNEL`` chooses: ``auto`` (default) runs the kernel for
CUDA tensors when Triton imports and the torch reference otherwise; ``triton`` forces the kernel (on CPU
that needs ``TRITON_INTERPRET=1`` set before Triton is first imported, as the tests do); ``torch``
forces the reference. Calls that need autograd through x, or activations of another dtype, always take
the torch path: the kernel has no backward.

Agreement with the reference: the dequantized weights are bit-identical and the sums are float32 in a
different order, so the outputs differ by about one rounding of the output to x's dtype. The tests
(interpreter, CPU) bound the max error by 2e-3 of the output's max magnitude for fp16, 2e-2 for bf16 and
1e-5 for fp32. On a GPU, fp32 activations use 3xTF32 dots (see `triton_tiles.accumulate`); the
benchmark (benchmarks/kernels.py) records the error it measures there.
"""

from __future__ import annotations

import functools
import os

import torch

from layerwise.core.errors import LayerwiseError

KERNEL_ENV = "LAYERWISE_KERNEL"
KERNEL_CHOICES = ("auto", "triton", "torch")
TRITON_BITS = (2, 3, 4, 8)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETER_PROGRAMS = 4  # split-K target under the interpreter: enough to exercise the split, few programs


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here (it is an optional dependency: the ``kernels`` extra)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_choice() -> str:
    """The value of ``LAYERWISE_KERNEL`` (auto | triton | torch); anything else is refused, not ignored."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise LayerwiseError(f"{KERNEL_ENV}={choice!r} is not one of {', '.join(KERNEL_CHOICES)}")
    return choice


def use_triton(x: torch.Tensor, bits: int) -> bool:
    """Whether a ``bits``-bit bitstream matmul of `x` should run the Triton kernel (see the module docstring)."""
    choice = kernel_choice()
    if choice == "torch":
        return False
    if bits not in TRITON_BITS or x.dtype not in TRITON_DTYPES or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if choice == "triton":
        if not triton_available():
            raise LayerwiseError(f"{KERNEL_ENV}=triton but triton cannot be imported; pip install 'layerwise[kernels]'")
        return True
    return x.is_cuda and triton_available()


def interpreted() -> bool:
    """Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at first import)."""
    from layerwise.kernels import triton_gemv

    return type(triton_gemv._gemv_kernel).__name__ == "InterpretedFunction"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_k(group_size: int, in_features: int, largest: int) -> tuple[int, bool]:
    """K tile and whether it stays inside one group: the largest power of two <= `largest` dividing the group."""
    if group_size >= in_features:
        return largest, True  # a single group: every tile is in group 0
    block = largest
    while block >= 16:
        if group_size % block == 0:
            return block, True
        block //= 2
    return largest, False


def _check(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
    group_size: int, in_features: int, sym: bool, bias: torch.Tensor | None,
) -> None:
    """Refuse what the kernel would read out of bounds or misinterpret, with the shapes in the message."""
    from layerwise.core.bitstream import words_per_row

    n = qweight.shape[0]
    n_groups = -(-in_features // group_size)
    problems = []
    if bits not in TRITON_BITS:
        problems.append(f"bits {bits} not in {TRITON_BITS}")
    if x.dtype not in TRITON_DTYPES:
        problems.append(f"activations are {x.dtype}, not fp16 / bf16 / fp32")
    if x.shape[-1] != in_features:
        problems.append(f"x has {x.shape[-1]} features, the weight {in_features}")
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n, words_per_row(in_features, bits)):
        problems.append(f"qweight is {qweight.dtype} {tuple(qweight.shape)}, expected int32 "
                        f"{(n, words_per_row(in_features, bits))}")
    if tuple(scales.shape) != (n, n_groups):
        problems.append(f"scales are {tuple(scales.shape)}, expected {(n, n_groups)}")
    zero_shape = (words_per_row(n, bits), n_groups)
    if not sym and (zeros is None or zeros.dtype != torch.int32 or tuple(zeros.shape) != zero_shape):
        problems.append(f"asymmetric needs packed int32 zeros of shape {zero_shape}")
    if bias is not None and tuple(bias.shape) != (n,):
        problems.append(f"bias is {tuple(bias.shape)}, expected {(n,)}")
    tensors = [t for t in (qweight, scales, zeros, bias) if t is not None]
    if any(t.device != x.device for t in tensors):
        problems.append("tensors on different devices")
    if problems:
        raise LayerwiseError("triton dequant_matmul: " + "; ".join(problems))


def triton_dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    sym: bool,
    bias: torch.Tensor | None = None,
    *,
    variant: str | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` in x's dtype from packed ``bitstream-v1`` buffers, as `torch_ref.dequant_matmul`.

    `variant` ("gemv" | "gemm") and `split_k` (number of K slices, GEMV only) override the choices made
    from M and the GPU's size, for tests and benchmarks; the GEMV variant takes at most
    `triton_gemv.MAX_M` rows.
    """
    from layerwise.kernels import triton_gemm, triton_gemv

    _check(x, qweight, scales, zeros, bits, group_size, in_features, sym, bias)
    interpreting = interpreted()
    if not x.is_cuda and not interpreting:
        raise LayerwiseError(
            "the Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 before Triton is first imported"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    variant = variant or ("gemv" if m <= triton_gemv.MAX_M else "gemm")
    if variant == "gemv" and m > triton_gemv.MAX_M:
        raise LayerwiseError(f"the gemv variant takes at most {triton_gemv.MAX_M} rows, got {m}")
    buffers = (x2, qweight.contiguous(), scales.contiguous(), None if sym else zeros.contiguous(),  # type: ignore[union-attr]
               None if bias is None else bias.to(x.dtype).contiguous(), out)
    # fp32 dots under the interpreter (its bf16 dot is broken) and for fp32 x (see triton_tiles.accumulate).
    precision = "ieee" if interpreting else ("tf32x3" if x.dtype == torch.float32 else "native")
    common = dict(bits=bits, group_size=group_size, sym=sym, dot_precision=precision)
    if variant == "gemv":
        block_k, per_tile = _block_k(group_size, in_features, triton_gemv.MAX_BLOCK_K)
        target = _INTERPRETER_PROGRAMS if interpreting else 2 * _sm_count(
            torch.cuda.current_device() if x.device.index is None else x.device.index)
        triton_gemv.launch(*buffers, block_k=block_k, group_per_tile=per_tile, target_programs=target,
                           forced_split=split_k, **common)  # type: ignore[arg-type]
    elif variant == "gemm":
        block_k, per_tile = _block_k(group_size, in_features, triton_gemm.MAX_BLOCK_K)
        triton_gemm.launch(*buffers, block_k=block_k, group_per_tile=per_tile, **common)  # type: ignore[arg-type]
    else:
        raise LayerwiseError(f"unknown kernel variant {variant!r}; choose gemv or gemm")
    return out.reshape(*lead, n)
