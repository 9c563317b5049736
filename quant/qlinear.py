"""`QuantLinear`: a drop-in replacement for a linear layer whose weight is stored packed.

Its state_dict holds exactly the stored tensors (``qweight``, ``scales``, optional ``zeros`` and
``bias``), so a quantized checkpoint is loaded by building empty modules of the right shapes
(`QuantLinear.empty`) and calling ``load_state_dict``; the plain attributes (bits, group size, ...) come
from the plan, not from the tensors. Shapes, dtypes and the dequantization come from the codec of
``spec.method`` (`layerwise.quant.codecs`), so one module class serves every storage format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.core.types import QuantSpec

# Imported for its registrations: the nf4 / int8 codecs must exist before a checkpoint naming them loads.
from layerwise.quant.codecs import allocate, codec_for
from layerwise.quant.quantized import QuantizedWeight

# Buffers whose dtype is part of the format: a whole-model ``.to(torch.bfloat16)`` must not touch them.
_FIXED_DTYPE_BUFFERS = ("qweight", "scales", "zeros")


class QuantLinear(nn.Module):
    """``y = x @ W.T + bias`` with W kept as packed low-bit codes and dequantized on the fly.

    `format` names the stored layout (``bitstream-v1`` for RTN / GPTQ, ``bnb-nf4``, ``bnb-int8-rowwise``).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """Zero-filled buffers of the right shapes; `dtype` is the bias dtype (the weight has none)."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = spec.bits
        self.group_size = spec.group_size
        self.sym = spec.sym
        self.method = spec.method
        self.grid = spec.grid  # how the scales were chosen: kept so `spec` round-trips; dequantizing ignores it
        self.gguf = spec.gguf  # a llama.cpp type: qweight holds its blocks (`codecs.GgufCodec`)
        self.format = codec_for(spec).format
        for name, buffer in allocate(out_features, in_features, spec, device).items():
            self.register_buffer(name, buffer)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.method, self.sym, self.grid, self.gguf)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool,
        dtype: torch.dtype = torch.float32,
    ) -> QuantLinear:
        """A module to `load_state_dict` a saved QuantLinear into (all buffers zero until then)."""
        return cls(in_features, out_features, spec, bias=bias, dtype=dtype)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        """Wrap a quantizer's result; `bias` keeps its own dtype and is copied, not shared."""
        if bias is not None and tuple(bias.shape) != (qw.out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not match {qw.out_features} outputs")
        module = cls(
            qw.in_features,
            qw.out_features,
            qw.spec,
            bias=bias is not None,
            dtype=bias.dtype if bias is not None else torch.float32,
            device=qw.qweight.device,
        )
        module.qweight.copy_(qw.qweight)
        if qw.scales is not None:
            module.scales.copy_(qw.scales)
        if qw.zeros is not None:
            assert module.zeros is not None
            module.zeros.copy_(qw.zeros)
        if bias is not None:
            assert module.bias is not None
            module.bias.copy_(bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.__dict__.get("_dense")
        if dense is not None:
            return F.linear(x, dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return codec_for(self.spec).matmul(x, self, self.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out_features, in_features) weight this module multiplies by."""
        return codec_for(self.spec).dequantize(self, dtype)

    @contextmanager
    def dense_weight(self) -> Iterator[None]:
        """Dequantize once and multiply by the dense weight until the block ends.

        For calibration passes that run a freshly quantized layer over many batches: the on-the-fly path
        would unpack the same codes for every batch. Costs one dense weight of memory while active.
        """
        self.__dict__["_dense"] = self.dequantize(torch.float32)
        try:
            yield
        finally:
            self.__dict__.pop("_dense", None)

    def storage_bits(self) -> int:
        """Bits of the quantized weight (codes, scales, zeros); the bias stays full precision and is excluded."""
        return self.spec.storage_bits(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, method={self.method}, bias={self.bias is not None}"
            + (f", gguf={self.gguf}" if self.gguf is not None else "")
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        """Let ``.to(device)`` move the packed buffers but never change their dtype.

        ``model.to(torch.bfloat16)`` would otherwise recast the fp16 scales and zeros, silently losing
        precision and producing a checkpoint that no longer matches the format.
        """
        kept = {name: self._buffers[name] for name in _FIXED_DTYPE_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            assert moved is not None
            if moved.dtype != original.dtype:
                self._buffers[name] = original.to(moved.device)
        return self


@contextmanager
def dense_weights(modules: Iterable[nn.Module]) -> Iterator[None]:
    """`QuantLinear.dense_weight` for every QuantLinear among `modules` (others are left alone)."""
    with ExitStack() as stack:
        for module in modules:
            if isinstance(module, QuantLinear):
                stack.enter_context(module.dense_weight())
        yield
