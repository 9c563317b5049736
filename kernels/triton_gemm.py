"""Large-M variant (prefill, batches: M > `triton_gemv.MAX_M`): a tiled GEMM, one output tile a program.

Each weight tile is dequantized once per BLOCK_M rows of x, so above a few dozen rows the cost is the
matmul itself, as in an fp16 GEMM. Programs are visited in groups of GROUP_M tile rows (the usual Triton
matmul swizzle) so that concurrently running programs share weight tiles in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from layerwise.kernels.triton_tiles import accumulate, store_tile

GROUP_M = 8
MAX_BLOCK_K = 32


def config(m: int) -> dict[str, int]:
    """One fixed tile shape per M range: 64x64 up to M = 64, else 128x128 (no autotuning; see triton_matmul).

    Two pipeline stages for 128x128: with three, ptxas (sm_90a) spills registers for 3-bit weights.
    """
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)


@triton.jit
def _gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_om, group_size,
    BITS: tl.constexpr, SYM: tl.constexpr, GROUP_PER_TILE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    m_blocks = tl.cdiv(M, BLOCK_M)
    n_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_blocks
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = accumulate(acc, x_ptr, stride_xm, offs_m, M, q_ptr, s_ptr, z_ptr, offs_n, N, K, stride_qn, stride_sn,
                     group_size, 0, K, BLOCK_K, BITS, SYM, GROUP_PER_TILE, DOT_PRECISION)
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, b_ptr, HAS_BIAS)


def launch(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bias: torch.Tensor | None, out: torch.Tensor, *, bits: int, group_size: int, sym: bool, block_k: int,
    group_per_tile: bool, dot_precision: str,
) -> None:
    """Write ``x @ W^T (+ bias)`` into `out` (M, N); x is (M, K) with unit stride in K."""
    m, k = x.shape
    n = qweight.shape[0]
    cfg = config(m)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemm_kernel[grid](
        x, qweight, scales, scales if zeros is None else zeros, out if bias is None else bias, out,
        m, n, k, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), group_size,
        BITS=bits, SYM=sym, GROUP_PER_TILE=group_per_tile, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision,
        BLOCK_K=block_k, GROUP_M=GROUP_M, **cfg,
    )
