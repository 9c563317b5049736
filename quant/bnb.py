"""bitsandbytes weight formats: NF4 (QLoRA, Dettmers et al. 2023) and row-wise int8 (LLM.int8(), 2022).

The point of these methods is compatibility: the stored tensors are exactly what bitsandbytes produces
for the weight, so a bitsandbytes user can rebuild its objects from a layerwise checkpoint without
re-quantizing. bitsandbytes is an optional dependency (``pip install bitsandbytes``), imported only
when a weight is quantized or dequantized, never by ``import layerwise``.

``nf4`` (format ``bnb-nf4``), for a (N, K) weight and block size g = ``spec.group_size``:

* ``qweight``: ``bitsandbytes.functional.quantize_4bit(W, blocksize=g, quant_type="nf4")``'s packed
  tensor unchanged, uint8 of shape (ceil(N*K/2), 1). The weight is flattened row-major; byte i holds
  code 2i in its high nibble and code 2i+1 in its low nibble (the same bytes as a ``Params4bit``).
* ``scales``: that call's ``absmax``, fp32 of shape (ceil(N*K/g),), one per block of g consecutive
  flattened weights, so a block may run across the end of a row.
* no zeros; ``w = NF4[code] * absmax[block]`` with bitsandbytes' 16-value NF4 codebook.
* To rebuild in bitsandbytes: ``QuantState(absmax=scales, shape=(N, K), blocksize=g, quant_type="nf4",
  code=get_4bit_type("nf4"), dtype=...)`` plus ``qweight`` as the ``Params4bit`` data.

``int8`` (format ``bnb-int8-rowwise``): ``qweight`` is the int8 (N, K) codes and ``scales`` the fp32 (N,)
row absmax of ``bitsandbytes.functional.int8_vectorwise_quant(W.half())`` (``Int8Params``' ``CB`` /
``SCB``); ``w = code * absmax / 127`` as ``int8_vectorwise_dequant`` computes it. Only the weight format
is LLM.int8()'s: the forward pass dequantizes and runs a float matmul, with no outlier decomposition.

Inputs: nf4 quantizes the weight in float32 (exact for fp16 / bf16 weights, and what bitsandbytes' 4-bit
path converts to internally on every backend). int8 quantizes the weight rounded to float16, because that
is what ``Int8Params`` does and bitsandbytes' CUDA kernel accepts nothing else; the extra rounding
(relative 2**-11) is small next to the int8 step (1/127 of the row absmax). The codes are those of
bitsandbytes' CPU backend; its CUDA kernel, given the same fp16 weight, picks another code for about 2 in
100,000 weights (checked with 0.50.2 on an H100), and dequantizes the stored codes identically.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import ClassVar

import torch
import torch.nn.functional as F

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.quant.codecs import CODECS, BufferLayout, Codec, Packed
from layerwise.quant.quantized import QuantizedWeight, check_weight
from layerwise.quant.registry import QUANTIZERS, Quantizer

NF4_FORMAT = "bnb-nf4"
INT8_FORMAT = "bnb-int8-rowwise"


def bnb_functional(method: str) -> ModuleType:
    """``bitsandbytes.functional``, or a LayerwiseError naming `method` and the install command.

    Any exception counts as "not usable": a broken install can fail at import with other errors than
    ImportError (a native library that does not load, for instance).
    """
    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:
        raise LayerwiseError(
            f"method {method!r} needs bitsandbytes, which cannot be imported ({type(exc).__name__}: {exc}); "
            "install it with `pip install bitsandbytes` (or `pip install layerwise[bnb]`)"
        ) from None
    return bnbf


def _failed(method: str, exc: Exception) -> LayerwiseError:
    return LayerwiseError(
        f"bitsandbytes failed to quantize to {method} ({type(exc).__name__}: {exc}); "
        "reinstall it with `pip install -U bitsandbytes`"
    )


def _float_weight(weight: torch.Tensor, method: str) -> torch.Tensor:
    check_weight(weight, method)
    # A copy, so that nothing bitsandbytes does in place can reach the model's own weight.
    return weight.detach().to(torch.float32, copy=True).contiguous()


def _check_method(spec: QuantSpec, method: str) -> None:
    if spec.method != method:
        raise LayerwiseError(f"the {method} quantizer was given a spec for method {spec.method!r}")


def quantize_nf4(weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """NF4 codes and block absmax exactly as ``bitsandbytes.functional.quantize_4bit`` makes them."""
    del hessian  # absmax rounding reads no calibration data; the argument keeps the common signature
    _check_method(spec, "nf4")
    w = _float_weight(weight, "nf4")
    bnbf = bnb_functional("nf4")
    try:
        packed, state = bnbf.quantize_4bit(w, blocksize=spec.group_size, quant_type="nf4")
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise _failed("nf4", exc) from None
    return QuantizedWeight(
        qweight=packed.contiguous(),
        scales=state.absmax.to(torch.float32).contiguous(),
        zeros=None,
        spec=spec,
        out_features=w.shape[0],
        in_features=w.shape[1],
    )



def quantize_int8(weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """Row-wise absmax int8 codes exactly as bitsandbytes' ``Int8Params`` makes them (from the fp16 weight).

    An all-zero row has absmax 0 and bitsandbytes divides by it (its codes are then a NaN cast, whatever
    the platform makes of that); those codes are set to 0, which is what the row dequantizes to anyway.
    """
    del hessian
    _check_method(spec, "int8")
    w = _float_weight(weight, "int8").to(torch.float16)
    if not torch.isfinite(w).all():
        raise LayerwiseError("int8 rounds the weight to float16 first, and it has values beyond ±65504")
    bnbf = bnb_functional("int8")
    try:
        codes, absmax, _ = bnbf.int8_vectorwise_quant(w)  # threshold 0: no outlier columns
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise _failed("int8", exc) from None
    absmax = absmax.to(torch.float32).contiguous()
    codes = codes.masked_fill((absmax == 0).unsqueeze(1), 0).contiguous()
    return QuantizedWeight(
        qweight=codes, scales=absmax, zeros=None, spec=spec, out_features=w.shape[0], in_features=w.shape[1]
    )



@QUANTIZERS.register("nf4")
class Nf4Quantizer(Quantizer):
    """bitsandbytes NF4 (`quantize_nf4`): no calibration data, bitsandbytes' packed 4-bit format."""

    name: ClassVar[str] = "nf4"
    needs_hessian: ClassVar[bool] = False
    storage: ClassVar[str] = NF4_FORMAT
    shares_hessian: ClassVar[bool] = False

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        return quantize_nf4(weight, spec, hessian)


@QUANTIZERS.register("int8")
class Int8Quantizer(Quantizer):
    """bitsandbytes row-wise int8 (`quantize_int8`): no calibration data, ``Int8Params``' format."""

    name: ClassVar[str] = "int8"
    needs_hessian: ClassVar[bool] = False
    storage: ClassVar[str] = INT8_FORMAT
    shares_hessian: ClassVar[bool] = False

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        return quantize_int8(weight, spec, hessian)


class Nf4Codec(Codec):
    """bitsandbytes' packed NF4 bytes and fp32 block absmax (see the module docstring).

    Dequantization is done here in plain torch rather than by ``bitsandbytes.functional.dequantize_4bit``
    on the 2-D state: bitsandbytes 0.50.2's CPU kernel for that disagrees with its own ``quantize_4bit``
    for many shapes whose rows are not a whole number of blocks (576x576 with block 128, for one), and
    its pure-torch fallback is ``torch.compile``-d once per shape. Only the codebook comes from
    bitsandbytes. Each value is one fp32 product ``code * absmax``, so the result is bit-identical to
    bitsandbytes' reference (``dequantize_4bit`` on the flattened state, which every backend agrees on).
    """

    format = NF4_FORMAT

    def layout(self, out_features: int, in_features: int, spec: QuantSpec) -> dict[str, BufferLayout | None]:
        n = out_features * in_features
        return {
            "qweight": BufferLayout((math.ceil(n / 2), 1), torch.uint8),
            "scales": BufferLayout((math.ceil(n / spec.group_size),), torch.float32),
            "zeros": None,
        }

    def dequantize(self, packed: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        code = bnb_functional("nf4").get_4bit_type("nf4", device=packed.qweight.device).to(torch.float32)
        n = packed.out_features * packed.in_features
        block = packed.spec.group_size
        data = packed.qweight.reshape(-1)
        nibbles = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:n]  # code 2i is the high nibble
        n_blocks = packed.scales.numel()
        # A short last block is padded so that every block multiplies by its absmax in one broadcast.
        values = F.pad(code[nibbles.long()], (0, n_blocks * block - n)).view(n_blocks, block)
        weight = (values * packed.scales.to(torch.float32).unsqueeze(1)).reshape(-1)[:n]
        return weight.view(packed.out_features, packed.in_features).to(dtype)


class Int8Codec(Codec):
    """bitsandbytes' row-wise int8 codes and fp32 row absmax (``Int8Params``' CB and SCB)."""

    format = INT8_FORMAT

    def layout(self, out_features: int, in_features: int, spec: QuantSpec) -> dict[str, BufferLayout | None]:
        return {
            "qweight": BufferLayout((out_features, in_features), torch.int8),
            "scales": BufferLayout((out_features,), torch.float32),
            "zeros": None,
        }

    def dequantize(self, packed: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        weight = bnb_functional("int8").int8_vectorwise_dequant(packed.qweight, packed.scales)
        return weight.to(torch.float32).to(dtype)


CODECS.register("nf4")(Nf4Codec())
CODECS.register("int8")(Int8Codec())
