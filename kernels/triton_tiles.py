"""Triton building blocks shared by the GEMV and GEMM variants: read a packed weight tile, multiply, store.

Both variants (`triton_gemv`, `triton_gemm`) only decide which output tile and which slice of K a program
owns; the reading of ``bitstream-v1`` codes, the dequantization and the accumulation live here once, so
the two cannot disagree about the format. The layout and the 3-bit extraction are described in
`layerwise.kernels.triton_matmul`.

Importing this module imports Triton, and whether a kernel is compiled or interpreted is fixed when it is
decorated: set ``TRITON_INTERPRET=1`` before the first import to run kernels on the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def read_codes(ptr, index, word_stride, mask, BITS: tl.constexpr):
    """Codes number `index` of ``bitstream-v1`` streams whose consecutive words lie `word_stride` apart.

    Code i sits at stream bit i*BITS: word (i*BITS) >> 5, from bit `shift` upwards. The weight codes are
    streams along a row (`word_stride` 1); packed zero points are streams down a group's column
    (`word_stride` = the number of groups). Masked lanes read 0.
    """
    bit = index * BITS
    shift = (bit & 31).to(tl.uint32)
    word_ptr = ptr + (bit >> 5) * word_stride
    # uint32 so that >> is a logical shift: the words are bit containers, bit 31 is not a sign.
    codes = tl.load(word_ptr, mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift
    if 32 % BITS != 0:
        # 3 bits: a code with shift > 32-BITS straddles; its high bits are the low bits of the next word.
        # The next word is read only where it is needed (it always exists there: every stream is padded
        # to whole words). `(32 - shift) & 31` keeps the shift amount legal in lanes that read 0 anyway.
        straddles = shift > 32 - BITS
        high = tl.load(word_ptr + word_stride, mask=mask & straddles, other=0).to(tl.uint32, bitcast=True)
        codes = codes | (high << ((32 - shift) & 31))
    return codes & ((1 << BITS) - 1)


@triton.jit
def dequant_tile_t(
    q_ptr, s_ptr, z_ptr, k0, offs_n, K, N, stride_qn, stride_sn, group_size,
    BLOCK_K: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
    W_DTYPE: tl.constexpr,
):
    """Dequantized weights ``W[offs_n, k0:k0+BLOCK_K]`` transposed to (BLOCK_K, BLOCK_N), in `W_DTYPE`.

    Transposed because ``tl.dot(x_tile, w_tile)`` wants K first. Columns past K and rows past N read as 0.
    The value is computed in float32 and rounded once to `W_DTYPE` (the activations' dtype), which is
    exactly the weight `torch_ref.dequantize(..., dtype=x.dtype)` produces. The packed zero points
    (ceil(N*BITS/32), G) have as many columns as the scales (N, G), so both use row stride `stride_sn`.
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask = (offs_k < K)[:, None] & mask_n[None, :]
    codes = read_codes(q_ptr + offs_n[None, :] * stride_qn, offs_k[:, None], 1, mask, BITS)
    if GROUP_PER_TILE:
        # The tile lies inside one group (BLOCK_K divides group_size): one scale / zero per row.
        group = k0 // group_size
        group_mask = mask_n[None, :]
    else:
        group = (offs_k // group_size)[:, None]
        group_mask = mask
    scale = tl.load(s_ptr + offs_n[None, :] * stride_sn + group, mask=group_mask, other=0.0).to(tl.float32)
    if SYM:
        zero = float(2 ** (BITS - 1))
    else:
        zero = read_codes(z_ptr + group, offs_n[None, :], stride_sn, group_mask, BITS).to(tl.float32)
    return ((codes.to(tl.float32) - zero) * scale).to(W_DTYPE)


@triton.jit
def accumulate(
    acc, x_ptr, stride_xm, offs_m, M, q_ptr, s_ptr, z_ptr, offs_n, N, K, stride_qn, stride_sn, group_size,
    k_start, k_end,
    BLOCK_K: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``acc += x[offs_m, k_start:k_end] @ W[offs_n, k_start:k_end]^T`` in float32.

    `k_start` is a multiple of BLOCK_K (so GROUP_PER_TILE tiles stay inside one group). DOT_PRECISION
    "native" multiplies in x's dtype (fp16 / bf16 tensor cores, fp32 accumulation). Otherwise both
    operands go to float32 and the string is tl.dot's `input_precision`: "tf32x3" for float32
    activations on a GPU (Triton's default TF32 keeps 10 mantissa bits, the torch reference keeps fp32's
    23; plain "ieee" compiles to FMAs that spill registers at these tile sizes), and "ieee" under the
    interpreter, where it is needed for every dtype: the interpreter's bf16 ``tl.dot`` silently returns
    garbage (values around 1e10). The weight is rounded to x's dtype first in every mode, so the
    operands are the reference's operands; "native" and "ieee" differ from it only in summation order,
    "tf32x3" also by product errors near fp32 rounding.
    """
    mask_m = (offs_m < M)[:, None]
    x_row = x_ptr + offs_m[:, None] * stride_xm
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs_k[None, :], mask=mask_m & (offs_k < K)[None, :], other=0.0)
        w = dequant_tile_t(q_ptr, s_ptr, z_ptr, k0, offs_n, K, N, stride_qn, stride_sn, group_size,
                           BLOCK_K, BITS, SYM, GROUP_PER_TILE, x_ptr.dtype.element_ty)
        if DOT_PRECISION == "native":
            acc += tl.dot(x, w)
        else:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, b_ptr, HAS_BIAS: tl.constexpr):
    """Add the bias (already in x's dtype, as the reference rounds it) and store in out's dtype."""
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])
