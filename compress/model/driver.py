"""Layer-sequential driver: run a model one decoder layer at a time over calibration windows.

The inputs of the first decoder layer are captured once (the model stops right after its embeddings),
together with the keyword arguments every layer receives (attention masks, rotary embeddings,
cache positions: they differ per layer on models with sliding-window layers such as gemma3). Then each
layer runs on all windows, its outputs become the next layer's inputs, and only one layer's inputs and
outputs are held at a time. Scorers read a step's inputs and outputs; quantizers (GPTQ) may replace the
layer's modules before the outputs are computed, so the next layer sees the compressed outputs.

With a `Placement` (`layerwise.model.placement`) each layer is moved to the placement's device (in its dtype)
for its step and home again after it; the first layer's inputs are captured with only the modules
outside the decoder layers on the device, and the activations between layers stay on the device or are
kept on the CPU (`activations_stay`, decided once per stream), read a batch at a time on the device
through `Activations`. Without one (`placement=None`) everything runs where the model is, as before.

A second stream (`reference=True`, for GPTAQ): beside the hidden states of the model as it is being
compressed, the driver carries the full-precision model's, kept the same way (`LayerStep.reference`). It
cannot compute them itself once a layer is quantized, so the consumer sets `reference_outputs` during the
step, running the layer on them while it still has its float weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from layerwise.core.progress import bar
from layerwise.model.adapter import decoder_layers, layers_path
from layerwise.model.layer_calls import LayerCall, layer_output, overridden_forward, split_hidden
from layerwise.model.placement import Activations, Onload, Placement, activations_stay, oom_as_error, pass_through


class _StopForward(Exception):
    pass


class LayerWeights(Protocol):
    """Where a model's decoder-layer weights live when they are not all in memory (`layerwise.engine.streaming`).

    The driver calls `load_outer` before capturing the first layer's inputs (embeddings in memory) and
    `release_outer` after; `load(i)` before layer i runs and `release(i)` once the consumer is done with it.
    """

    def load_outer(self) -> None: ...

    def release_outer(self) -> None: ...

    def load(self, index: int) -> nn.Module: ...

    def release(self, index: int) -> None: ...


@contextmanager
def _placeholder_layers(layers: nn.ModuleList) -> Iterator[None]:
    """Every decoder layer returns its input unchanged: a forward then only records the layers' calls.

    Used when the layers' weights are not in memory (on the meta device): the model still computes the
    masks and position embeddings every layer receives, while the layers themselves do nothing.
    """

    @pass_through
    def identity(*args: Any, **kwargs: Any) -> torch.Tensor:
        return split_hidden(args, kwargs)[0]

    with overridden_forward(dict.fromkeys(layers, identity)):
        yield


def window_batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split windows into equal batches (the largest size <= `batch_size` that divides their number).

    Equal batches matter: the captured call arguments (attention masks) are shaped for one batch size.
    """
    n = windows.shape[0]
    size = max(d for d in range(1, min(batch_size, n) + 1) if n % d == 0)
    return list(windows.split(size))


@torch.inference_mode()
def capture_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 1, *, placeholders: bool = False,
    placement: Placement | None = None, offload: bool = False,
) -> tuple[list[torch.Tensor], list[LayerCall]]:
    """First-layer hidden states for every batch of windows, and each layer's call arguments.

    One full forward of the first batch records every layer's arguments; the other batches stop at
    the first layer. All batches have the same shape, so the arguments are shared by all of them.
    With `placeholders` the layers do not run (their weights may be on the meta device): each passes
    its input through while its call is recorded, and the forward stops after the last layer.
    With a `placement` the layers never run either (placeholders): the modules outside them, less the
    head, are on the placement's device for the capture, so the hidden states and call arguments are
    made there, in its dtype; the hidden states are kept on the CPU when `offload`.
    """
    layers = decoder_layers(model)
    device = model.get_input_embeddings().weight.device if placement is None else placement.device
    placeholders = placeholders or placement is not None
    hidden: list[torch.Tensor] = []
    calls: list[LayerCall | None] = [None] * len(layers)
    record_all = True

    def pre_hook(index: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h, call = split_hidden(args, kwargs)
            if index == 0:
                hidden.append(h.detach().to("cpu") if offload else h.detach().clone())
            if record_all:
                calls[index] = call
            if (not record_all and index == 0) or (placeholders and index == len(layers) - 1):
                raise _StopForward

        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with ExitStack() as stack:
            if placeholders:
                stack.enter_context(_placeholder_layers(layers))
            if placement is not None:
                head = model.get_output_embeddings()
                outer = Onload(model, placement, skip=[layers, *([head] if head is not None else [])])
                stack.callback(outer.release)
            for b, batch in enumerate(window_batches(windows, batch_size)):
                record_all = b == 0
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"decoder layers {missing} of {layers_path(model)} were not called in forward")
    return hidden, [c for c in calls if c is not None]


@dataclass
class LayerStep:
    """One decoder layer with the inputs it receives from the (possibly already compressed) layers before.

    `inputs` holds one hidden-state tensor [batch, length, hidden] per batch of calibration windows.
    With a `placement` the layer is on its device for the step, `inputs` and `outputs` are `Activations`
    (read on the device, kept on the CPU when `offload`), and `release()` sends the layer home early.
    With a reference stream, `reference` holds the full-precision model's inputs to this layer, batch for
    batch, and the consumer sets `reference_outputs` (`forward` each batch, `keep` each output, `kept` all).
    """

    index: int
    name: str
    layer: nn.Module
    inputs: Sequence[torch.Tensor]
    call: LayerCall
    outputs: Sequence[torch.Tensor] | None = None
    placement: Placement | None = field(default=None, repr=False)
    offload: bool = field(default=False, repr=False)
    onload: Onload | None = field(default=None, repr=False, compare=False)
    reference: Sequence[torch.Tensor] | None = None
    reference_outputs: Sequence[torch.Tensor] | None = None

    @torch.inference_mode()
    def run(self) -> list[torch.Tensor] | Activations:
        """The layer's outputs on every input window, as the layer is now."""
        # One batch on the device at a time; each output offloaded as soon as it is made.
        return self.kept([self.keep(self.forward(h)) for h in self.inputs])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output on one batch `hidden`, as the layer is now."""
        return layer_output(self.layer(hidden, *self.call.args, **self.call.kwargs))

    def keep(self, output: torch.Tensor) -> torch.Tensor:
        """One batch's output moved to where this stream keeps activations (as `run` does with each)."""
        return output.to(self.placement.storage) if self.placement is not None and self.offload else output

    def kept(self, outputs: list[torch.Tensor]) -> list[torch.Tensor] | Activations:
        """Outputs made batch by batch (each through `keep`), as `run` returns them."""
        return outputs if self.placement is None else Activations(outputs, self.placement.device)

    def release(self) -> None:
        """Send the layer home now (with a placement; otherwise nothing), e.g. before writing it out.

        Call it once the step's `outputs` are set: the layer does not come back to the device.
        """
        if self.onload is not None:
            self.onload.release()


def stream_layers(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "layers",
    weights: LayerWeights | None = None,
    start: int = 0,
    hidden: Sequence[torch.Tensor] | None = None,
    placement: Placement | None = None,
    reference: bool = False,
    reference_hidden: Sequence[torch.Tensor] | None = None,
) -> Iterator[LayerStep]:
    """Yield each decoder layer with its inputs; advance with the step's `outputs` (computed if unset).

    `batch_size` windows run through a layer together: faster on a GPU, about the same on a CPU.
    With `weights` the model's layers are on the meta device: each is loaded before its step and
    released after it, so one layer's weights and activations are in memory at a time. `start` and
    `hidden` resume a stream at layer `start` with that layer's saved inputs (a resumed compression).
    With a `placement` each layer is on its device for its step (see the module docstring).
    With `reference` the full-precision stream comes along (`LayerStep.reference`; the consumer sets each
    step's `reference_outputs`); it starts as the first layer's inputs, or `reference_hidden` on resuming.
    """
    was_training = model.training
    model.eval()
    streams = 2 if reference else 1
    try:
        offload = placement is not None and not activations_stay(
            streams * stream_activation_bytes(model, windows, placement), placement,
            layer_reserve_bytes(model, placement, cross_terms=reference))
        if weights is not None:
            weights.load_outer()
        try:
            with oom_as_error("capturing the first layer's inputs", None, placement):
                first, calls = capture_inputs(model, windows, batch_size, placeholders=weights is not None,
                                              placement=placement, offload=offload)
        finally:
            if weights is not None:
                weights.release_outer()
        if start and (hidden is None or (reference and reference_hidden is None)):
            raise ValueError("a stream started after layer 0 needs that layer's inputs (hidden, reference_hidden)")
        hidden = first if hidden is None else hidden
        fp: Sequence[torch.Tensor] | None = None
        if reference:
            fp = first if reference_hidden is None else reference_hidden
        if placement is not None:
            hidden = Activations.keep(hidden, placement, offload)
            fp = None if fp is None else Activations.keep(fp, placement, offload)
        prefix = layers_path(model)
        layers = decoder_layers(model)
        for i in _layer_bar(len(layers), start, desc, progress):
            with _held(layers, i, weights, placement) as (layer, onload):
                step = LayerStep(i, f"{prefix}.{i}", layer, hidden, calls[i], placement=placement, offload=offload,
                                 onload=onload, reference=fp)
                yield step
                if step.outputs is None:
                    with oom_as_error("running the layer", i, placement):
                        step.outputs = step.run()
                if reference:
                    if step.reference_outputs is None:
                        raise RuntimeError(f"layer {i}: the consumer of a reference stream must set the step's "
                                           "reference_outputs (the layer's float outputs on step.reference)")
                    fp = step.reference_outputs
                hidden = step.outputs
                del step
    finally:
        model.train(was_training)


def hidden_size(model: nn.Module) -> int:
    """Width of the hidden states between decoder layers."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return int(model.get_input_embeddings().weight.shape[-1])


def stream_activation_bytes(model: nn.Module, windows: torch.Tensor, placement: Placement) -> int:
    """Bytes of one layer's inputs and outputs on all windows, in the placement's dtype."""
    return 2 * windows.numel() * hidden_size(model) * placement.dtype.itemsize


def layer_reserve_bytes(model: nn.Module, placement: Placement, cross_terms: bool = False) -> int:
    """Device memory a layer's step needs beside the activations: the largest layer's weights in the
    placement's dtype, plus float32 room for quantization temporaries and one Hessian per linear (and one
    cross term per linear too with `cross_terms`, GPTAQ's)."""
    from layerwise.model.adapter import linear_modules, linear_shape

    per_linear = 8 if cross_terms else 4
    largest = 0
    for layer in decoder_layers(model):
        weights = sum(p.numel() for p in layer.parameters())
        hessians = sum(linear_shape(m)[1] ** 2 for m in linear_modules(layer).values() if hasattr(m, "weight"))
        largest = max(largest, weights * (placement.dtype.itemsize + 8) + per_linear * hessians)
    return largest


def each_layer(
    model: nn.Module, *, progress: bool = True, desc: str = "layers", weights: LayerWeights | None = None,
    start: int = 0, placement: Placement | None = None,
) -> Iterator[LayerStep]:
    """Yield every decoder layer without activations (weight-only work), loading and releasing it with
    `weights` when the layers are not in memory, and onloading it for its step with a `placement`."""
    layers = decoder_layers(model)
    for i in _layer_bar(len(layers), start, desc, progress):
        with _held(layers, i, weights, placement) as (layer, onload):
            yield LayerStep(i, str(i), layer, [], LayerCall(), placement=placement, onload=onload)


def _layer_bar(count: int, start: int, desc: str, progress: bool) -> Iterable[int]:
    """Layer indices `start`..`count`-1 with a progress bar that counts the skipped ones as done."""
    return bar(range(start, count), desc=desc, disable=not progress, unit="layer", initial=start, total=count)


@contextmanager
def _held(layers: Sequence[nn.Module], index: int, weights: LayerWeights | None,
          placement: Placement | None) -> Iterator[tuple[nn.Module, Onload | None]]:
    """Layer `index` for one step: loaded first when streamed, on the placement's device during it.

    The streamed weights are released only after a step that finished; a failed step leaves them for
    the error path to discard with the model.
    """
    layer = weights.load(index) if weights is not None else layers[index]
    onload = Onload(layer, placement) if placement is not None else None
    try:
        yield layer, onload
    finally:
        if onload is not None:
            onload.release()
    if weights is not None:
        weights.release(index)
