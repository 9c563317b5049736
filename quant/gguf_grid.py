"""Quantizing on llama.cpp's own grids: each GGUF type's scales computed up front, codes, and the block bytes.

A GGUF type (`layerwise.core.gguf_types`) stores per sub-block a scale, for some types a min, in its own
number formats (fp16 super-block scales times 4-, 6- or 8-bit integers), and dequantizes every weight as
``scale * c + offset`` in float32. `gguf_grid` computes those stored numbers from a weight, once, before
any code is chosen (static groups: GPTQ then sweeps the columns against fixed scales, as act-order
already does), and returns both the integers the blocks hold and the float32 (scale, offset) per sub-block
that the dequantization will compute from them, operation for operation. `pack_blocks` writes codes and
those integers as the type's bytes; the `gguf` package's dequantizer reads them back, and the tests use it
as the oracle: ``dequantize(pack_blocks(...)) == scale * c + offset`` exactly.

Scales are chosen from each sub-block's range (llama.cpp's reference quantizers without their iterative
search): a signed type maps the weight of largest magnitude to the most negative code; a type with a min
uses ``[min(w, 0), max(w)]``. Sub-block scales (and mins) are then expressed on the super-block's grid:
``d = largest / top``, each sub-block's integer the nearest multiple of ``d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from layerwise.core.gguf_types import GgufType


@dataclass
class GgufGrid:
    """The stored numbers of one weight's blocks and the float32 grid they define.

    `scale` and `offset` are (rows, sub-blocks of the row) float32: weight ``k`` of a row dequantizes as
    ``scale[:, k // sub_block] * c + offset[:, k // sub_block]``. `d` (and `dmin`) are the fp16 block or
    super-block scales (rows, blocks); `sc` (and `m`) the sub-block integers (rows, sub-blocks), absent for
    the legacy types, whose `d` (and `dmin`, the min) are per sub-block already.
    """

    kind: GgufType
    scale: torch.Tensor
    offset: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    m: torch.Tensor | None = None

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest codes of `weight` (rows, K) on this grid, int32 in [cmin, cmax] (round to nearest)."""
        scale, offset = self.expand(0, weight.shape[1])
        return nearest_codes(weight, scale, offset, self.kind.cmin, self.kind.cmax).to(torch.int32)

    def expand(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, stop - start) scale and offset of columns start..stop."""
        groups = torch.arange(start, stop, device=self.scale.device) // self.kind.sub_block
        return self.scale[:, groups], self.offset[:, groups]

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """``scale * c + offset`` in float32, as the type's dequantizer computes it."""
        scale, offset = self.expand(0, codes.shape[1])
        return scale * codes.to(torch.float32) + offset


def nearest_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, low: float | torch.Tensor,
                  high: float | torch.Tensor) -> torch.Tensor:
    """``clamp(round((w - offset) / scale), low, high)`` as float32 (integers); a zero scale (an all-zero
    sub-block) gives code 0. The bounds are numbers or tensors that broadcast (GPTQ's per-row code ranges)."""
    ratio = torch.where(scale == 0, 0.0, (w - offset) / torch.where(scale == 0, 1.0, scale))
    return torch.clamp(ratio.round_(), low, high)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Rounded to fp16 (overflow clamped to the largest finite value), back in float32."""
    return x.clamp(-65504.0, 65504.0).to(torch.float16).to(torch.float32)


def _signed_extreme(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dimension, with its sign."""
    return torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def _on_super_grid(values: torch.Tensor, top: int, low: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block values (rows, blocks, subs) as fp16 ``d`` per block times integers in [low, top]: ``d`` maps
    the block's largest value to `top` (for signed values, the one of largest magnitude to `low`)."""
    if low < 0:
        d = _fp16(_signed_extreme(values) / low)
    else:
        d = _fp16(values.amax(dim=-1) / top)
    safe = torch.where(d == 0, 1.0, d)
    ints = torch.where(d[..., None] == 0, 0.0, (values / safe[..., None]).round()).clamp(low, top)
    return d, ints


def gguf_grid(weight: torch.Tensor, kind: GgufType) -> GgufGrid:
    """The grid of `weight` (rows, K), K a multiple of the type's block, as the type stores it."""
    w = weight.detach().to(torch.float32)
    rows, width = w.shape
    subs = w.reshape(rows, width // kind.block, kind.block // kind.sub_block, kind.sub_block)
    if kind.block == kind.sub_block:  # legacy: one fp16 scale (and min) per block of 32
        blocks = subs[:, :, 0]
        if kind.has_min:
            low, high = blocks.amin(-1), blocks.amax(-1)
            d, m = _fp16((high - low) / kind.cmax), _fp16(low)
            return GgufGrid(kind, d, m, d, dmin=m)
        # q4_0 / q5_0 map the extreme weight to the most negative code, as llama.cpp does; q8_0 to +-127.
        d = _fp16(_signed_extreme(blocks) / (kind.cmax if kind.bits == 8 else kind.cmin))
        return GgufGrid(kind, d, torch.zeros_like(d), d)
    if kind.has_min:  # q2_k, q4_k, q5_k: (d * sc) * c - (dmin * m), mins below zero only
        low = subs.amin(-1).clamp(max=0.0)
        sub_scale = (subs.amax(-1) - low) / kind.cmax
        top = 15 if kind.name == "q2_k" else 63
        d, sc = _on_super_grid(sub_scale, top, 0)
        dmin, m = _on_super_grid(-low, top, 0)
        scale = (d[..., None] * sc).reshape(rows, -1)
        offset = -(dmin[..., None] * m).reshape(rows, -1)
        return GgufGrid(kind, scale, offset, d, dmin, sc.to(torch.int32), m.to(torch.int32))
    # q3_k, q6_k: (d * sc) * c with signed sub-block scales; the extreme weight maps to cmin
    sub_scale = _signed_extreme(subs) / kind.cmin
    d, sc = _on_super_grid(sub_scale, 31 if kind.name == "q3_k" else 127, -32 if kind.name == "q3_k" else -128)
    scale = (d[..., None] * sc).reshape(rows, -1)
    return GgufGrid(kind, scale, torch.zeros_like(scale), d, sc=sc.to(torch.int32))


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    """(rows, blocks) float32 holding fp16 values -> (rows, blocks, 2) uint8, little-endian."""
    return x.to(torch.float16).cpu().numpy().view(np.uint8).reshape(*x.shape, 2)


def _nibbles(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return (low & 0xF) | ((high & 0xF) << 4)


def pack_blocks(grid: GgufGrid, codes: torch.Tensor) -> torch.Tensor:
    """The type's bytes for `codes` (rows, K) on `grid`: uint8 (rows, K / block * bytes per block)."""
    kind = grid.kind
    rows, width = codes.shape
    n = width // kind.block
    u = (codes.cpu().numpy().astype(np.int32) - kind.cmin).astype(np.uint8).reshape(rows, n, kind.block)
    if kind.block == 32:
        parts = [_f16_bytes(grid.d)]
        if kind.has_min:
            assert grid.dmin is not None
            parts.append(_f16_bytes(grid.dmin))
        if kind.bits == 8:
            parts.append((u.astype(np.int16) + kind.cmin).astype(np.int8).view(np.uint8))
        else:
            if kind.bits == 5:
                parts.append(np.packbits((u >> 4) & 1, axis=-1, bitorder="little"))
            parts.append(_nibbles(u[..., :16], u[..., 16:]))
        out = np.concatenate(parts, axis=-1)
    else:
        out = _pack_k(kind, grid, u, rows, n)
    return torch.from_numpy(np.ascontiguousarray(out.reshape(rows, n * kind.nbytes)))


def _pack_k(kind: GgufType, grid: GgufGrid, u: np.ndarray, rows: int, n: int) -> np.ndarray:
    assert grid.sc is not None
    sc = grid.sc.cpu().numpy().astype(np.int32)
    if kind.name == "q2_k":
        assert grid.m is not None and grid.dmin is not None
        scales = (sc | (grid.m.cpu().numpy().astype(np.int32) << 4)).astype(np.uint8)
        qs = _two_bit_planes(u & 3)
        return np.concatenate([scales, qs, _f16_bytes(grid.d), _f16_bytes(grid.dmin)], axis=-1)
    if kind.name == "q3_k":
        qs = _two_bit_planes(u & 3)
        # The high bit of element i (h = i // 128, j = (i % 128) // 32, l = i % 32) is bit 4h + j of hmask[l].
        high = ((u >> 2) & 1).reshape(rows, n, 8, 32)  # plane 4h + j, position l
        return np.concatenate([_bit_planes(high), qs, _q3_scales(sc + 32), _f16_bytes(grid.d)], axis=-1)
    if kind.name in ("q4_k", "q5_k"):
        assert grid.m is not None and grid.dmin is not None
        scales = _k4_scales(sc, grid.m.cpu().numpy().astype(np.int32))
        chunks = u.reshape(rows, n, 4, 2, 32)  # 64-weight chunks: 32 in low nibbles, 32 in high
        qs = _nibbles(chunks[:, :, :, 0, :], chunks[:, :, :, 1, :]).reshape(rows, n, 128)
        parts = [_f16_bytes(grid.d), _f16_bytes(grid.dmin), scales]
        if kind.name == "q5_k":  # bit 4 of element i is bit i // 32 of qh[i % 32]
            parts.append(_bit_planes(((u >> 4) & 1).reshape(rows, n, 8, 32)))
        return np.concatenate([*parts, qs], axis=-1)
    # q6_k: h = i // 128, k = (i % 128) // 32, l = i % 32; low 4 bits in ql[64h + l + 32(k & 1)] (low nibble
    # for k < 2, high otherwise), high 2 bits at bits 2k of qh[32h + l].
    halves = u.reshape(rows, n, 2, 4, 32)
    ql = np.concatenate([
        np.concatenate([_nibbles(halves[:, :, h, 0], halves[:, :, h, 2]),
                        _nibbles(halves[:, :, h, 1], halves[:, :, h, 3])], axis=-1) for h in (0, 1)], axis=-1)
    qh = np.concatenate([
        ((halves[:, :, h, 0] >> 4) | ((halves[:, :, h, 1] >> 4) << 2) | ((halves[:, :, h, 2] >> 4) << 4)
         | ((halves[:, :, h, 3] >> 4) << 6)).astype(np.uint8) for h in (0, 1)], axis=-1)
    scales = sc.astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh, scales, _f16_bytes(grid.d)], axis=-1)


def _bit_planes(bits: np.ndarray) -> np.ndarray:
    """One bit of 256 elements, given as 8 planes of 32 (rows, blocks, 8, 32), into 32 bytes: plane p at bit p."""
    out = np.zeros(bits.shape[:2] + (32,), dtype=np.uint8)
    for plane in range(8):
        out |= (bits[:, :, plane, :] << plane).astype(np.uint8)
    return out


def _two_bit_planes(q2: np.ndarray) -> np.ndarray:
    """2-bit values of 256 elements into 64 bytes: element i (h = i // 128, j = (i % 128) // 32, l = i % 32)
    at bits 2j of byte 32h + l."""
    rows, n = q2.shape[:2]
    planes = q2.reshape(rows, n, 2, 4, 32).astype(np.uint8)
    out = planes[:, :, :, 0] | (planes[:, :, :, 1] << 2) | (planes[:, :, :, 2] << 4) | (planes[:, :, :, 3] << 6)
    return out.reshape(rows, n, 64)


def _q3_scales(s6: np.ndarray) -> np.ndarray:
    """16 unsigned 6-bit scales into 12 bytes: low nibbles of 0-7 / 8-15 in bytes 0-7 (low / high nibble),
    the top 2 bits of scale k at bits 2 * (k // 4) of byte 8 + k % 4."""
    s6 = s6.astype(np.uint8)
    low = _nibbles(s6[..., :8], s6[..., 8:])
    top = (s6 >> 4) & 3
    high = np.zeros((*s6.shape[:-1], 4), dtype=np.uint8)
    for k in range(16):
        high[..., k % 4] |= (top[..., k] << (2 * (k // 4))).astype(np.uint8)
    return np.concatenate([low, high], axis=-1)


def _k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins into 12 bytes (ggml's get_scale_min_k4, inverted)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    first = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    second = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    third = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return np.concatenate([first, second, third], axis=-1).astype(np.uint8)


def dequantize_blocks(data: torch.Tensor, kind: GgufType, in_features: int) -> torch.Tensor:
    """The (rows, in_features) float32 weight the type's bytes stand for, by the `gguf` package's dequantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType[kind.name.upper()]
    values = dequantize(data.cpu().numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1, in_features).to(data.device)
