"""Storage formats ("codecs"): which buffers a quantized weight keeps and how they turn back into weights.

Most methods (RTN, GPTQ) differ only in how they *choose* codes, so they share one format, the
``bitstream-v1`` packing with fp16 group scales and bit-packed zero points. A method whose storage is
different (the bitsandbytes NF4 and int8 formats) registers a `Codec` under its method name in `CODECS`;
every other method gets `BITSTREAM`, and a spec naming a GGUF type gets `GGUF` (llama.cpp's blocks).
`QuantizedWeight` and `QuantLinear` ask `codec_for(spec)` for buffer shapes and for the dequantization,
so neither needs an ``if method == ...`` branch, and checkpoint loading (`QuantLinear.empty`) builds the
right shapes for any spec the plan names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from layerwise.core.bitstream import PackFormat, words_per_row
from layerwise.core.gguf_types import GGUF_TYPES
from layerwise.core.registry import Registry
from layerwise.core.types import QuantSpec
from layerwise.kernels import torch_ref, triton_matmul

BUFFER_NAMES = ("qweight", "scales", "zeros")


@dataclass(frozen=True)
class BufferLayout:
    """Shape and dtype one stored tensor must have."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')} {self.shape}"


class Packed(Protocol):
    """What a codec reads: both `QuantizedWeight` and `QuantLinear` look like this."""

    qweight: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    out_features: int
    in_features: int

    @property
    def spec(self) -> QuantSpec: ...


class Codec(ABC):
    """One storage format: its name, its buffer layout and its dequantization."""

    format: str

    @abstractmethod
    def layout(self, out_features: int, in_features: int, spec: QuantSpec) -> dict[str, BufferLayout | None]:
        """Layout of each of `BUFFER_NAMES`; None means the format does not store that buffer."""

    @abstractmethod
    def dequantize(self, packed: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out_features, in_features) weight the stored tensors stand for."""

    def matmul(self, x: torch.Tensor, packed: Packed, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` in x's dtype; a format with a fused kernel overrides this."""
        weight = self.dequantize(packed, dtype=x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


class BitstreamCodec(Codec):
    """``bitstream-v1`` codes, fp16 per-group scales and (unless symmetric) `bits`-bit zero points packed down
    each group's column (`layerwise.core.bitstream.pack_zeros`): RTN, GPTQ, GPTAQ."""

    format = PackFormat.BITSTREAM

    def layout(self, out_features: int, in_features: int, spec: QuantSpec) -> dict[str, BufferLayout | None]:
        n_groups = spec.n_groups(in_features)
        zeros = BufferLayout((words_per_row(out_features, spec.bits), n_groups), torch.int32)
        return {
            "qweight": BufferLayout((out_features, words_per_row(in_features, spec.bits)), torch.int32),
            "scales": BufferLayout((out_features, n_groups), torch.float16),
            "zeros": None if spec.sym else zeros,
        }

    def dequantize(self, packed: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        spec = packed.spec
        return torch_ref.dequantize(
            packed.qweight, packed.scales, packed.zeros, spec.bits, spec.group_size, packed.in_features, spec.sym, dtype
        )

    def matmul(self, x: torch.Tensor, packed: Packed, bias: torch.Tensor | None) -> torch.Tensor:
        # The fused Triton kernel for CUDA tensors (or when LAYERWISE_KERNEL forces it), else the torch
        # reference; both take the same arguments. Decided per call from this module's own bit width.
        spec = packed.spec
        kernel = triton_matmul.triton_dequant_matmul if triton_matmul.use_triton(x, spec.bits) else (
            torch_ref.dequant_matmul
        )
        return kernel(
            x, packed.qweight, packed.scales, packed.zeros, spec.bits, spec.group_size, packed.in_features, spec.sym,
            bias,
        )


BITSTREAM = BitstreamCodec()


class GgufCodec(Codec):
    """llama.cpp's own blocks (`layerwise.core.gguf_types`), stored as the bytes a GGUF file holds: uint8
    (N, K / block * bytes per block). Dequantized by the `gguf` package (`quant.gguf_grid.dequantize_blocks`)."""

    format = "gguf-blocks"

    def layout(self, out_features: int, in_features: int, spec: QuantSpec) -> dict[str, BufferLayout | None]:
        assert spec.gguf is not None
        row_bytes = GGUF_TYPES[spec.gguf].row_bytes(in_features)
        return {"qweight": BufferLayout((out_features, row_bytes), torch.uint8), "scales": None, "zeros": None}

    def dequantize(self, packed: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from layerwise.quant.gguf_grid import dequantize_blocks

        assert packed.spec.gguf is not None
        return dequantize_blocks(packed.qweight, GGUF_TYPES[packed.spec.gguf], packed.in_features).to(dtype)


GGUF = GgufCodec()

CODECS: Registry[Codec] = Registry("storage format")


def codec_for(key: str | QuantSpec) -> Codec:
    """The codec of a spec (a GGUF type's blocks, else its method's) or of a method: the one the method
    registered, else the shared bitstream format."""
    if isinstance(key, QuantSpec):
        if key.gguf is not None:
            return GGUF
        key = key.method
    return CODECS.get(key) if key in CODECS else BITSTREAM


def allocate(
    out_features: int, in_features: int, spec: QuantSpec, device: torch.device | str | None = None
) -> dict[str, torch.Tensor | None]:
    """Zero-filled buffers (or None) in the layout `spec`'s codec stores, e.g. to load a checkpoint into."""
    layout = codec_for(spec).layout(out_features, in_features, spec)
    return {
        name: None if buf is None else torch.zeros(buf.shape, dtype=buf.dtype, device=device)
        for name, buf in layout.items()
    }
