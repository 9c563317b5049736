"""Bit-packing of integer quantization codes into int32 words: one format for every bit width.

Format ``bitstream-v1`` (`PackFormat.BITSTREAM`)
-----------------------------------------------
A weight of shape (N, K) holds integer codes in ``[0, 2**bits)``. Each row is packed on its own as a
little-endian bitstream:

* code ``k`` of a row occupies bits ``[k*bits, (k+1)*bits)`` of that row's stream, least significant
  bit first, where stream bit ``i`` is bit ``i % 32`` of word ``i // 32`` (bit 0 = least significant);
* the stream is padded with zero bits up to a whole number of 32-bit words;
* the result is a ``torch.int32`` tensor of shape ``(N, ceil(K*bits/32))``; the words are plain bit
  containers, so a word whose bit 31 is set reads as a negative int32.

For 2, 4 and 8 bits no code straddles a word (``32/bits`` codes per word, code ``k`` sits at shift
``(k % (32/bits)) * bits`` of word ``k // (32/bits)``). For 3 bits codes do straddle word boundaries:
32 codes fill exactly 3 words, and codes 10 and 21 of each such block are split across two words.

Asymmetric zero points are packed the same way along the other axis (`pack_zeros`): the zeros of one
group, read down the N rows, form one stream, so an (N, G) table becomes int32 (ceil(N*bits/32), G).

Why one bitstream for all widths: the storage cost is exactly ``bits`` per code (plus row padding), which
is what `QuantSpec.storage_bits` budgets, and a single layout keeps every reader -- the torch reference
path here and the GPU kernels in ``layerwise.kernels`` -- in agreement. Rows are independent so a kernel
can unpack any row (output feature) without touching the others.
"""

from __future__ import annotations

import math
from enum import Enum

import torch

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import SUPPORTED_BITS

_WORD_BITS = 32
_WORD_MASK = (1 << _WORD_BITS) - 1


class PackFormat(str, Enum):
    """Name of a packed-code layout; stored next to the codes so a reader can refuse what it cannot read."""

    BITSTREAM = "bitstream-v1"


def words_per_row(in_features: int, bits: int) -> int:
    """Number of int32 words one packed row of `in_features` codes takes."""
    return math.ceil(in_features * bits / _WORD_BITS)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise LayerwiseError(f"cannot pack {bits}-bit codes; choose one of {', '.join(map(str, SUPPORTED_BITS))}")


def _code_positions(in_features: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit shift inside that word of every code in a row.

    A code starting at shift ``s`` spans bits ``[s, s+bits)`` of the 64-bit pair (word, word+1); since
    ``s < 32`` and ``bits <= 8`` it always fits in an int64, which is how straddling codes are handled.
    """
    start = torch.arange(in_features, device=device, dtype=torch.int64) * bits
    return start // _WORD_BITS, start % _WORD_BITS


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 values in [0, 2**32) as int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes of shape (N, K) into the ``bitstream-v1`` layout: int32 of shape (N, W).

    W is ``ceil(K*bits/32)``. Codes must be integers in ``[0, 2**bits)``; anything else is refused rather
    than silently truncated, because a wrapped code would decode to a wrong weight without any error.
    """
    _check_bits(bits)
    if codes.dim() != 2:
        raise LayerwiseError(f"pack expects a 2-D (out_features, in_features) code tensor, got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise LayerwiseError(f"pack expects integer codes, got dtype {codes.dtype}")
    n_rows, in_features = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise LayerwiseError(
            f"{bits}-bit codes must lie in [0, {2**bits - 1}], got range [{int(codes.min())}, {int(codes.max())}]"
        )
    n_words = words_per_row(in_features, bits)
    word, shift = _code_positions(in_features, bits, codes.device)
    out = torch.empty(n_rows, n_words, dtype=torch.int32, device=codes.device)
    # Rows are packed independently, so a few at a time: the int64 temporaries then take a bounded
    # amount of memory instead of several times the (int32) codes of a whole 11008x4096 weight.
    for rows in row_chunks(n_rows, in_features):
        chunk = codes[rows].to(torch.int64)
        shifted = chunk << shift  # at most 39 bits wide: fits in int64 without overflow
        # One spare word so that the high half of the last code always has somewhere to go; it stays zero.
        acc = torch.zeros(chunk.shape[0], n_words + 1, dtype=torch.int64, device=codes.device)
        # Codes never share bits, so adding the pieces is the same as OR-ing them in.
        acc.index_add_(1, word, shifted & _WORD_MASK)
        acc.index_add_(1, word + 1, shifted >> _WORD_BITS)
        out[rows] = _to_int32_bits(acc[:, :n_words])
    return out


# Elements of a row-chunked temporary (`row_chunks`): 2**22 int64 or float32 values, 32 or 16 MiB.
CHUNK_ELEMENTS = 2**22


def row_chunks(n_rows: int, row_length: int) -> list[slice]:
    """Slices covering `n_rows` rows, each at most `CHUNK_ELEMENTS` values (and at least one row) long.

    For row-independent work on big weights (packing, dequantizing, RTN): done a chunk at a time into a
    preallocated result, it gives exactly the same values with temporaries of a bounded size.
    """
    step = max(1, CHUNK_ELEMENTS // max(row_length, 1))
    return [slice(a, min(a + step, n_rows)) for a in range(0, n_rows, step)] or [slice(0, 0)]


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer zero points (N, G) in ``[0, 2**bits)`` packed down each column: int32 (ceil(N*bits/32), G).

    Column g is one ``bitstream-v1`` stream of the N rows' zeros, the layout compressed-tensors uses for
    ``weight_zero_point``. Float tensors holding integers (what a grid computes) are accepted; any other
    value is refused, since rounding it here would change the weight silently.
    """
    if zeros.dtype.is_floating_point:
        rounded = zeros.round()
        if not torch.equal(rounded, zeros):
            raise LayerwiseError("zero points must be integers to be packed; the grid produced fractional ones")
        zeros = rounded.to(torch.int64)
    return pack(zeros.T.contiguous(), bits).T.contiguous()


def unpack_zeros(packed: torch.Tensor, bits: int, n_rows: int) -> torch.Tensor:
    """Inverse of `pack_zeros`: the (n_rows, G) zero points as uint8."""
    return unpack(packed.T.contiguous(), bits, n_rows).T.contiguous()


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack`: the (N, in_features) codes as uint8."""
    _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise LayerwiseError(f"unpack expects a 2-D int32 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    n_words = words_per_row(in_features, bits)
    if packed.shape[1] != n_words:
        raise LayerwiseError(
            f"{in_features} {bits}-bit codes per row need {n_words} words, but the packed tensor has "
            f"{packed.shape[1]}; the checkpoint does not match its spec"
        )
    if _WORD_BITS % bits == 0:
        # No code straddles a word: shift each word once per code it holds (the common 2/4/8-bit case).
        per_word = _WORD_BITS // bits
        shifts = torch.arange(0, _WORD_BITS, bits, device=packed.device, dtype=torch.int32)
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(packed.shape[0], n_words * per_word)[:, :in_features].to(torch.uint8)
    word, shift = _code_positions(in_features, bits, packed.device)
    words = packed.to(torch.int64) & _WORD_MASK
    # Append a zero word so that `word + 1` is always a valid index.
    words = torch.cat([words, words.new_zeros(words.shape[0], 1)], dim=1)
    # Only the low bits of the next word can belong to a straddling code (fewer than 8 of them); masking
    # first keeps the shifted value far from the int64 sign bit.
    pairs = words[:, word] | ((words[:, word + 1] & 0xFF) << _WORD_BITS)
    return ((pairs >> shift) & (2**bits - 1)).to(torch.uint8)
