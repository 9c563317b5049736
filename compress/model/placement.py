"""Where the work runs: one decoder layer at a time on a device (a GPU), in a chosen dtype.

The model's weights stay where they are loaded (their *home*: the CPU, or the meta device between the
layers a streamed model reads from disk). A `Placement` names the device the work runs on and the dtype
the layers compute in. Before a decoder layer's step (its calibration forward, Hessians, scoring,
quantization) `onloaded` moves the layer's parameters there, cast to that dtype; afterwards it puts the
original tensors back, so the home copy is never rounded, and moves whatever the step added (the
`QuantLinear` modules quantization swaps in) home as well. Buffers move but keep their dtype: packed
codes, fp16 scales and float32 rotary frequencies are part of their format. While a layer is on the
device its parameters are read-only: a change made to their values there is not written back.

Activations between layers (one tensor per batch of calibration windows) stay on the device when they
fit (`activations_stay`: their bytes against the free device memory, with a safety margin) and are kept
on the CPU otherwise; either way a consumer reads them through `Activations`, which hands each batch out
on the device, so only one batch at a time is transferred. Hessians and GPTQ's arithmetic stay float32
whatever the dtype (`layerwise.quant.hessian`, `layerwise.quant.gptq`).

Whole-model forwards (perplexity, the sensitivity scorer's Fisher pass, `ppl_drop`, lm-eval) run under
`sequential_onload`: the modules outside the decoder layers sit on the device for the duration, and each
decoder layer is moved there by a forward pre-hook and back by a forward hook; a model that fits in the
free device memory is simply moved whole and back. With `placement=None` nothing here runs at all and
every caller behaves exactly as it did before placements existed (CPU, the model's own dtype).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, overload

import torch
from torch import nn

from layerwise.core.errors import LayerwiseError
from layerwise.model.device import parse_dtype

# Share of the free device memory the activations (or a whole model) may take: the rest is left for a
# layer's weights, its float32 Hessians and quantization temporaries, and the allocator's fragmentation.
DEVICE_MEMORY_FRACTION = 0.8
# Attribute `pass_through` sets on an instance-level `forward` that does not read the layer's weights.
_PASS_THROUGH = "layerwise_pass_through"
OOM_FIX = "use --stream, fewer --calib-windows, or a smaller --calib-len"

def placement_for(device: torch.device, dtype: torch.dtype) -> Placement | None:
    """The placement of a run on `device` in `dtype`; None for the CPU in float32 (nothing to place)."""
    if device.type == "cpu" and dtype == torch.float32:
        return None
    return Placement(device, dtype)


@dataclass(frozen=True)
class Placement:
    """Run each decoder layer's work on `device` in `dtype`; the weights stay home in between.

    `offload_activations`: True keeps the activations between layers on the CPU, False on the device,
    None decides by the free device memory (`activations_stay`). `device` may be given as a string.
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    offload_activations: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        if isinstance(self.dtype, torch.dtype) and not self.dtype.is_floating_point:
            raise LayerwiseError(f"a placement computes in a floating dtype, not {self.dtype}")
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.device.type == "meta":
            raise LayerwiseError("the meta device holds no values; place the work on cpu or a GPU (cuda)")

    @classmethod
    def cpu(cls) -> Placement:
        """Today's behaviour, spelled out: the CPU in float32."""
        return cls(torch.device("cpu"), torch.float32)

    @property
    def storage(self) -> torch.device:
        """Where activations are kept between uses when they are offloaded."""
        return torch.device("cpu")

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the device; a floating parameter-like tensor also in the placement's dtype."""
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=self.device, dtype=dtype)


def pass_through(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a replacement `forward` that returns without reading its layer's weights (ppl_drop's bypassed
    layers, the driver's placeholders): `sequential_onload` leaves a layer running it home."""
    setattr(forward, _PASS_THROUGH, True)
    return forward


def runs_pass_through(module: nn.Module) -> bool:
    """Whether `module`'s instance-level `forward` is marked by `pass_through`."""
    return bool(getattr(module.__dict__.get("forward"), _PASS_THROUGH, False))


def same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, an index left out matching any index (``cuda`` and ``cuda:0``)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


# ------------------------------------------------------------------------------------------- onloading
def _walk(root: nn.Module, skip: set[int]) -> Iterator[nn.Module]:
    """`root` and its submodules, leaving out the subtrees of the modules whose id is in `skip`."""
    if id(root) in skip:
        return
    yield root
    for child in root.children():
        yield from _walk(child, skip)


def _home_of(modules: list[nn.Module]) -> tuple[torch.device | None, torch.dtype | None]:
    """Device of the first tensor not on the meta device, dtype of the first floating parameter."""
    device = dtype = None
    for module in modules:
        for p in module._parameters.values():
            if p is None or p.device.type == "meta":
                continue
            device = device or p.device
            if dtype is None and p.is_floating_point():
                dtype = p.dtype
        if device is None:
            device = next((b.device for b in module._buffers.values() if b is not None and b.device.type != "meta"),
                          None)
    return device, dtype


class Onload:
    """The tensors of `root` (less the subtrees in `skip`) moved to a placement until `release()`.

    Parameters move to the placement's device in its dtype (floating ones), buffers to its device in their
    own dtype; tensors already there and tensors on the meta device are left alone. `release()` (which
    may be called more than once) puts back the original tensors and moves what the step added home:
    modules created meanwhile (quantized ones) go to the home device, their floating tensors in the home
    dtype except those whose dtype is fixed by their format (`QuantLinear` keeps its codes and scales).
    """

    def __init__(self, root: nn.Module, placement: Placement, skip: Iterable[nn.Module] = ()) -> None:
        self.root = root
        self.placement = placement
        self.skip = {id(m) for m in skip}
        modules = list(_walk(root, self.skip))
        self.home_device, self.home_dtype = _home_of(modules)
        self._known: weakref.WeakSet[nn.Module] = weakref.WeakSet(modules)  # not ids: a new module may reuse one
        # (module, attribute, home tensor, placed tensor) per moved parameter or buffer slot
        self._moved: list[tuple[weakref.ref[nn.Module], str, torch.Tensor, torch.Tensor]] = []
        self.released = False
        placed_params: dict[int, nn.Parameter] = {}  # a parameter shared by several modules moves once
        with torch.inference_mode(False), torch.no_grad():  # normal tensors, whatever mode the caller is in
            for module in modules:
                for name, p in module._parameters.items():
                    if p is None or not self._moves(p, cast=True):
                        continue
                    if id(p) not in placed_params:
                        placed_params[id(p)] = nn.Parameter(placement.place(p.detach()), requires_grad=p.requires_grad)
                    self._moved.append((weakref.ref(module), name, p, placed_params[id(p)]))
                    module._parameters[name] = placed_params[id(p)]
                for name, b in module._buffers.items():
                    if b is None or not self._moves(b, cast=False):
                        continue
                    placed = b.to(placement.device)
                    self._moved.append((weakref.ref(module), name, b, placed))
                    module._buffers[name] = placed

    def _moves(self, tensor: torch.Tensor, cast: bool) -> bool:
        if tensor.device.type == "meta":
            return False
        if not same_device(tensor.device, self.placement.device):
            return True
        return cast and tensor.is_floating_point() and tensor.dtype != self.placement.dtype

    @property
    def moved(self) -> bool:
        """Whether anything was moved (False when everything already was where the placement asks)."""
        return bool(self._moved)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        restored: set[tuple[int, str]] = set()
        for module_ref, name, home, placed in self._moved:
            module = module_ref()
            if module is None:
                continue
            slots = module._parameters if isinstance(home, nn.Parameter) else module._buffers
            if slots.get(name) is placed:
                slots[name] = home
                restored.add((id(module), name))
        self._moved = []
        if self.home_device is not None:
            with torch.inference_mode(False), torch.no_grad():
                self._send_home(restored)

    def _send_home(self, restored: set[tuple[int, str]]) -> None:
        device, dtype = self.home_device, self.home_dtype
        assert device is not None

        def home(t: torch.Tensor) -> torch.Tensor:
            if t.device.type == "meta":
                return t
            if t.is_floating_point() and dtype is not None:
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        for module in _walk(self.root, self.skip):
            if module not in self._known:  # added during the step: its own _apply keeps fixed dtypes
                module._apply(home, recurse=False)
                continue
            for name, b in module._buffers.items():
                if b is not None and (id(module), name) not in restored and b.device.type != "meta" \
                        and not same_device(b.device, device):
                    module._buffers[name] = b.to(device)
            for name, p in module._parameters.items():
                if p is not None and (id(module), name) not in restored and p.device.type != "meta" \
                        and not same_device(p.device, device):
                    module._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)


@contextmanager
def onloaded(layer: nn.Module, placement: Placement | None) -> Iterator[Onload | None]:
    """`layer` on the placement's device (in its dtype) for the block, home again afterwards.

    Nothing happens for `placement=None`. Modules the block adds to the layer are moved home too.
    """
    if placement is None:
        yield None
        return
    onload = Onload(layer, placement)
    try:
        yield onload
    finally:
        onload.release()


# ------------------------------------------------------------------------------------------- activations
def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (a CUDA device), or None where that is not known (the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def activations_stay(activations: int | Iterable[torch.Tensor], placement: Placement, reserve_bytes: int = 0) -> bool:
    """Whether activations (a byte count, or the tensors) stay on the device rather than on the CPU.

    `offload_activations` decides when set (on the CPU "offloaded" ones are simply kept where they are);
    otherwise they stay when they and `reserve_bytes` (what the work beside them needs: a layer's
    weights, Hessians) fit in `DEVICE_MEMORY_FRACTION` of the free device memory. On the CPU they stay.
    """
    if placement.offload_activations is not None:
        return not placement.offload_activations
    if placement.device.type == "cpu":
        return True
    free = free_device_memory(placement.device)
    if free is None:
        return True
    nbytes = activations if isinstance(activations, int) else tensor_bytes(activations)
    return nbytes + reserve_bytes <= DEVICE_MEMORY_FRACTION * free


class Activations(Sequence[torch.Tensor]):
    """One hidden-state tensor per batch, stored on the device or offloaded to the CPU, read on the device.

    Indexing and iterating hand each tensor out on `device` (a copy when it is stored elsewhere, so one
    batch at a time is transferred); a slice is another `Activations`. `stored` gives the tensors as kept.
    """

    def __init__(self, tensors: Iterable[torch.Tensor], device: torch.device) -> None:
        self.stored = list(tensors)
        self.device = device

    @classmethod
    def keep(cls, tensors: Iterable[torch.Tensor], placement: Placement, offload: bool) -> Activations:
        """`tensors` moved (and cast) to where activations are kept: the CPU when `offload`, else the device."""
        where = placement.storage if offload else placement.device
        return cls([t.to(device=where, dtype=placement.dtype) for t in tensors], placement.device)

    def __len__(self) -> int:
        return len(self.stored)

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> Activations: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | Activations:
        if isinstance(index, slice):
            return Activations(self.stored[index], self.device)
        return self.stored[index].to(self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for tensor in self.stored:
            yield tensor.to(self.device)

    def __repr__(self) -> str:
        where = sorted({str(t.device) for t in self.stored})
        return f"Activations({len(self)} batches stored on {', '.join(where) or '-'}, read on {self.device})"


# ------------------------------------------------------------------------------------- whole-model forwards
def model_bytes(model: nn.Module, placement: Placement) -> int:
    """Bytes of the model's parameters and buffers once on the device (floating parameters in its dtype)."""
    size = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            size += p.numel() * (placement.dtype.itemsize if p.is_floating_point() else p.element_size())
    return size + tensor_bytes(b for b in model.buffers())


def model_fits(model: nn.Module, placement: Placement, reserve_bytes: int = 0) -> bool:
    """Whether the whole model and `reserve_bytes` fit in `DEVICE_MEMORY_FRACTION` of the free device memory.

    Never on the CPU: there a placement only changes the dtype, and one layer at a time keeps one layer's
    cast copy in memory instead of the whole model's.
    """
    free = free_device_memory(placement.device)
    return free is not None and model_bytes(model, placement) + reserve_bytes <= DEVICE_MEMORY_FRACTION * free


def _placed(model: nn.Module, placement: Placement) -> bool:
    """Whether every parameter and buffer of the model already is where (and as) the placement asks."""
    for p in model.parameters():
        if p.device.type != "meta" and (not same_device(p.device, placement.device) or (
                p.is_floating_point() and p.dtype != placement.dtype)):
            return False
    return all(b.device.type == "meta" or same_device(b.device, placement.device) for b in model.buffers())


@dataclass
class ForwardProgress:
    """What `sequential_onload` yields: the decoder layer whose forward ran last (None before the first)."""

    layer: int | None = None
    whole: bool = False  # the whole model was moved at once
    onloaded: dict[int, Onload] = field(default_factory=dict)


@contextmanager
def sequential_onload(model: nn.Module, placement: Placement | None, *, what: str = "forward pass",
                      whole: bool | None = None) -> Iterator[ForwardProgress]:
    """Run whole-model forwards inside the block with the model on the placement's device, a layer at a time.

    The modules outside the decoder layers (embeddings, final norm, head) are moved for the duration;
    each decoder layer is moved by a forward pre-hook and back by a forward hook (a layer whose instance
    `forward` is marked `pass_through` is not moved). `whole=True` moves the whole model at once instead,
    `whole=None` does so when it fits (`model_fits`). The hooks are removed and everything is home again
    when the block ends, also on an error. Running out of device memory raises a `LayerwiseError` naming
    the layer and `what` was running. Meant for inference and for activation-checkpointed backward passes
    whose recomputation onloads the layer itself (`layerwise.importance.sensitivity`): a plain backward
    would find the layers' weights home again. With `placement=None`, or a model already in place, the
    block runs as it is.
    """
    progress = ForwardProgress()
    if placement is None or _placed(model, placement):
        yield progress
        return
    with oom_as_error(what, lambda: progress.layer, placement):
        if model_fits(model, placement) if whole is None else whole:
            progress.whole = True
            with onloaded(model, placement):
                yield progress
            return
        from layerwise.model.adapter import decoder_layers

        layers = decoder_layers(model)
        outer = Onload(model, placement, skip=[layers])

        def pre_hook(index: int):
            def hook(module: nn.Module, args: Any) -> None:
                if runs_pass_through(module):
                    return
                progress.layer = index
                if index not in progress.onloaded:
                    progress.onloaded[index] = Onload(module, placement)

            return hook

        def post_hook(index: int):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                onload = progress.onloaded.pop(index, None)
                if onload is not None:
                    onload.release()

            return hook

        handles = [layer.register_forward_pre_hook(pre_hook(i)) for i, layer in enumerate(layers)]
        handles += [layer.register_forward_hook(post_hook(i)) for i, layer in enumerate(layers)]
        try:
            yield progress
        finally:
            for handle in handles:
                handle.remove()
            for onload in progress.onloaded.values():  # a forward that failed half-way
                onload.release()
            progress.onloaded.clear()
            outer.release()


# ------------------------------------------------------------------------------------------- errors
def out_of_memory(what: str, layer: int | None, placement: Placement | None = None) -> LayerwiseError:
    """The one-line error for a device that ran out of memory at decoder `layer` while doing `what`."""
    device = f"{placement.device} " if placement is not None else ""
    where = f" at decoder layer {layer}" if layer is not None else ""
    return LayerwiseError(f"{device}out of GPU memory{where} ({what}); {OOM_FIX}")


@contextmanager
def oom_as_error(what: str, layer: int | Callable[[], int | None] | None = None,
                 placement: Placement | None = None) -> Iterator[None]:
    """Turn `torch.cuda.OutOfMemoryError` raised in the block into `out_of_memory`'s `LayerwiseError`.

    `layer` may be a callable, read when the error happens. Only for a placement on a GPU: on the CPU
    (or without a placement) errors pass through unchanged.
    """
    if placement is None or placement.device.type == "cpu":
        yield
        return
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        index = layer() if callable(layer) else layer
        raise out_of_memory(what, index, placement) from None
