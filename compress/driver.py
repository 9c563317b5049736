"""Layer-sequential driver: run a model one decoder layer at a time over calibration windows.

The inputs of the first decoder layer are captured once (the model stops right after its embeddings),
together with the keyword arguments every layer receives (attention masks, rotary embeddings,
cache positions: they differ per layer on models with sliding-window layers such as gemma3). Then each
layer runs on all windows, its outputs become the next layer's inputs, and only one layer's inputs and
outputs are held at a time. Scorers read a step's inputs and outputs; quantizers (GPTQ) may replace the
layer's modules before the outputs are computed, so the next layer sees the compressed outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from layerwise.models import decoder_layers, layers_path


class _StopForward(Exception):
    pass


class LayerWeights(Protocol):
    """Where a model's decoder-layer weights live when they are not all in memory (`layerwise.streaming`).

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

    def identity(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _split_hidden(args, kwargs)[0]

    for layer in layers:
        layer.forward = identity
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


@dataclass
class LayerCall:
    """The arguments a decoder layer was called with, apart from its hidden-state input."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def _split_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, LayerCall]:
    kwargs = dict(kwargs)
    if args:
        return args[0], LayerCall(tuple(args[1:]), kwargs)
    return kwargs.pop("hidden_states"), LayerCall((), kwargs)


def layer_output(output: Any) -> torch.Tensor:
    """Decoder layers return a tensor or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple | list) else output


def window_batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split windows into equal batches (the largest size <= `batch_size` that divides their number).

    Equal batches matter: the captured call arguments (attention masks) are shaped for one batch size.
    """
    n = windows.shape[0]
    size = max(d for d in range(1, min(batch_size, n) + 1) if n % d == 0)
    return list(windows.split(size))


@torch.inference_mode()
def capture_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 1, *, placeholders: bool = False
) -> tuple[list[torch.Tensor], list[LayerCall]]:
    """First-layer hidden states for every batch of windows, and each layer's call arguments.

    One full forward of the first batch records every layer's arguments; the other batches stop at
    the first layer. All batches have the same shape, so the arguments are shared by all of them.
    With `placeholders` the layers do not run (their weights may be on the meta device): each passes
    its input through while its call is recorded, and the forward stops after the last layer.
    """
    layers = decoder_layers(model)
    device = model.get_input_embeddings().weight.device
    hidden: list[torch.Tensor] = []
    calls: list[LayerCall | None] = [None] * len(layers)
    record_all = True

    def pre_hook(index: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h, call = _split_hidden(args, kwargs)
            if index == 0:
                hidden.append(h.detach().clone())
            if record_all:
                calls[index] = call
            if (not record_all and index == 0) or (placeholders and index == len(layers) - 1):
                raise _StopForward

        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with _placeholder_layers(layers) if placeholders else nullcontext():
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
    """

    index: int
    name: str
    layer: nn.Module
    inputs: list[torch.Tensor]
    call: LayerCall
    outputs: list[torch.Tensor] | None = None

    @torch.inference_mode()
    def run(self) -> list[torch.Tensor]:
        """The layer's outputs on every input window, as the layer is now."""
        return [layer_output(self.layer(h, *self.call.args, **self.call.kwargs)) for h in self.inputs]


def stream_layers(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "layers",
    weights: LayerWeights | None = None,
    start: int = 0,
    hidden: list[torch.Tensor] | None = None,
) -> Iterator[LayerStep]:
    """Yield each decoder layer with its inputs; advance with the step's `outputs` (computed if unset).

    `batch_size` windows run through a layer together: faster on a GPU, about the same on a CPU.
    With `weights` the model's layers are on the meta device: each is loaded before its step and
    released after it, so one layer's weights and activations are in memory at a time. `start` and
    `hidden` resume a stream at layer `start` with that layer's saved inputs (a resumed compression).
    """
    was_training = model.training
    model.eval()
    try:
        if weights is not None:
            weights.load_outer()
        try:
            first, calls = capture_inputs(model, windows, batch_size, placeholders=weights is not None)
        finally:
            if weights is not None:
                weights.release_outer()
        if start and hidden is None:
            raise ValueError("a stream started after layer 0 needs that layer's inputs (hidden)")
        hidden = first if hidden is None else hidden
        prefix = layers_path(model)
        layers = decoder_layers(model)
        for i in tqdm(range(start, len(layers)), desc=desc, disable=not progress, unit="layer", initial=start,
                      total=len(layers)):
            layer = weights.load(i) if weights is not None else layers[i]
            step = LayerStep(i, f"{prefix}.{i}", layer, hidden, calls[i])
            yield step
            hidden = step.outputs if step.outputs is not None else step.run()
            del step
            if weights is not None:
                weights.release(i)
    finally:
        model.train(was_training)


def each_layer(
    model: nn.Module, *, progress: bool = True, desc: str = "layers", weights: LayerWeights | None = None,
    start: int = 0,
) -> Iterator[LayerStep]:
    """Yield every decoder layer without activations (weight-only work), loading and releasing it with
    `weights` when the layers are not in memory."""
    layers = decoder_layers(model)
    for i in tqdm(range(start, len(layers)), desc=desc, disable=not progress, unit="layer", initial=start,
                  total=len(layers)):
        layer = weights.load(i) if weights is not None else layers[i]
        yield LayerStep(i, str(i), layer, [], LayerCall())
        if weights is not None:
            weights.release(i)
