"""Small-M variant (decode: M = batch x new tokens <= `MAX_M`): split-K over a single M tile.

With M this small the work is reading the weight once: every program owns one BLOCK_N slice of the
outputs for *all* M rows (so each packed word is read from memory once, not once per row) and one of
SPLIT_K slices of K. A 4096-output layer has only 64 BLOCK_N slices, fewer than an H100 has SMs, so K is
split until there are about two programs per SM. Split partial sums go to a float32 buffer that torch
sums afterwards: a fixed order, so results do not change run to run as they would with atomic adds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from layerwise.kernels.triton_tiles import accumulate, store_tile

MAX_M = 16  # one tl.dot tile of rows (its minimum M); above this the tiled GEMM reuses weights across rows
BLOCK_M = 16
BLOCK_N = 64
MAX_BLOCK_K = 64
NUM_WARPS = 4
MAX_SPLIT_K = 16


@triton.jit
def _gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_om, stride_split, group_size, k_per_split,
    BITS: tl.constexpr, SYM: tl.constexpr, GROUP_PER_TILE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = accumulate(acc, x_ptr, stride_xm, offs_m, M, q_ptr, s_ptr, z_ptr, offs_n, N, K, stride_qn, stride_sn,
                     group_size, k_start, k_end, BLOCK_K, BITS, SYM, GROUP_PER_TILE, DOT_PRECISION)
    # With a split, slice pid_k of the (SPLIT_K, M, N) partial buffer; the bias is added after the sum.
    store_tile(out_ptr + pid_k * stride_split, acc, offs_m, offs_n, M, N, stride_om, b_ptr, HAS_BIAS)


def split_k(n_blocks: int, k_blocks: int, target_programs: int) -> int:
    """How many K slices give about `target_programs` programs (never an empty slice, at most MAX_SPLIT_K)."""
    wanted = max(1, min(MAX_SPLIT_K, k_blocks, target_programs // max(n_blocks, 1)))
    return triton.cdiv(k_blocks, triton.cdiv(k_blocks, wanted))


def launch(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bias: torch.Tensor | None, out: torch.Tensor, *, bits: int, group_size: int, sym: bool, block_k: int,
    group_per_tile: bool, dot_precision: str, target_programs: int, forced_split: int | None = None,
) -> None:
    """Write ``x @ W^T (+ bias)`` into `out` (M, N) for M <= MAX_M; x is (M, K) with unit stride in K."""
    m, k = x.shape
    n = qweight.shape[0]
    n_blocks, k_blocks = triton.cdiv(n, BLOCK_N), triton.cdiv(k, block_k)
    splits = min(forced_split, k_blocks) if forced_split else split_k(n_blocks, k_blocks, target_programs)
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    splits = triton.cdiv(k, k_per_split)
    target = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[(n_blocks, splits)](
        x, qweight, scales, scales if zeros is None else zeros, out if bias is None else bias, target,
        m, n, k, x.stride(0), qweight.stride(0), scales.stride(0), target.stride(-2),
        target.stride(0) if splits > 1 else 0, group_size, k_per_split,
        BITS=bits, SYM=sym, GROUP_PER_TILE=group_per_tile, HAS_BIAS=bias is not None and splits == 1,
        DOT_PRECISION=dot_precision, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    if splits > 1:
        total = target.sum(0)
        if bias is not None:
            total += bias.to(torch.float32)
        out.copy_(total)
