"""The llama.cpp (GGUF) weight types layerwise quantizes to directly: block sizes, bytes, code ranges, fallbacks.

Facts from ggml's ``ggml-common.h`` and ``ggml-quants.c`` (layouts and dequantization) and llama.cpp's
``src/llama-quant.cpp`` (which type a tensor falls back to when its rows do not fill whole blocks), as read
for docs/export.md. Every type stores rows of ``block`` weights; a block holds per-sub-block scales (and
mins) and one code per weight, and dequantizes each weight as ``scale * c + offset`` with an integer code
``c`` in ``[cmin, cmax]``:

* legacy types (block 32, one sub-block): ``q4_0`` / ``q5_0`` / ``q8_0`` ``d * c`` with signed c;
  ``q4_1`` / ``q5_1`` ``d * c + m`` (``d``, ``m`` fp16);
* k-quants (super-blocks of 256): ``q2_k`` / ``q4_k`` / ``q5_k`` ``(d * sc) * c - (dmin * m)`` with 4- or
  6-bit sub-block scales ``sc`` and mins ``m``; ``q3_k`` / ``q6_k`` ``(d * sc) * c`` with signed 6- or
  8-bit sub-block scales and signed codes.

`bits` is the code width; `bits_per_weight` what a weight really costs, scales included (``bytes * 8 /
block``): 4.5 for q4_k, 3.4375 for q3_k, 6.5625 for q6_k.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerwise.core.errors import LayerwiseError


@dataclass(frozen=True)
class GgufType:
    name: str  # lower case, as in `--options q4_k` and llama.cpp's file-type names
    block: int  # weights per block (a row holds whole blocks)
    nbytes: int  # bytes per block
    bits: int  # code width
    sub_block: int  # weights sharing one scale (and min)
    cmin: int  # codes are integers in [cmin, cmax]
    cmax: int
    has_min: bool  # dequantizes as scale * c + offset with a stored min; else scale * c

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.block

    def row_bytes(self, in_features: int) -> int:
        return in_features // self.block * self.nbytes


GGUF_TYPES: dict[str, GgufType] = {t.name: t for t in (
    GgufType("q4_0", 32, 18, 4, 32, -8, 7, False),
    GgufType("q4_1", 32, 20, 4, 32, 0, 15, True),
    GgufType("q5_0", 32, 22, 5, 32, -16, 15, False),
    GgufType("q5_1", 32, 24, 5, 32, 0, 31, True),
    GgufType("q8_0", 32, 34, 8, 32, -128, 127, False),
    GgufType("q2_k", 256, 84, 2, 16, 0, 3, True),
    GgufType("q3_k", 256, 110, 3, 16, -4, 3, False),
    GgufType("q4_k", 256, 144, 4, 32, 0, 15, True),
    GgufType("q5_k", 256, 176, 5, 32, 0, 31, True),
    GgufType("q6_k", 256, 210, 6, 16, -32, 31, False),
)}

# llama.cpp's fallback for a tensor whose rows are not a whole number of 256-weight super-blocks
# (llama-quant.cpp, `tensor_type_fallback`, in the llama.cpp that llama-cpp-python 0.3.36 vendors:
# q2_k and q3_k go to q4_0 there; older llama.cpp used iq4_nl, which the gguf package cannot write).
FALLBACKS = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def gguf_type(name: str) -> GgufType:
    if name not in GGUF_TYPES:
        raise LayerwiseError(f"unknown GGUF type {name!r}; choose one of {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[name]


def fitted_gguf_type(name: str, in_features: int) -> str | None:
    """The type a row of `in_features` weights gets when `name` is asked for: itself when whole blocks fit,
    else llama.cpp's fallback when its blocks fit; None when neither does."""
    if in_features % GGUF_TYPES[name].block == 0:
        return name
    fallback = FALLBACKS.get(name)
    if fallback is not None and in_features % GGUF_TYPES[fallback].block == 0:
        return fallback
    return None
