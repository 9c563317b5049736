"""Measured sensitivity: what quantizing one layer alone, with each candidate option, does to its output.

For decoder layer i with full-precision input x (from the unmodified model) and output y = f_i(x), and
each option o (bits x group size x method), the layer's linears are quantized with o and the layer is run
again on the same inputs, giving y_o. The error delta = y_o - y lands in the residual stream. How much it
costs depends on the direction: LLM residual streams carry a few huge "massive activation" dimensions
that the loss barely reacts to, so a plain relative error ||delta||^2 / ||y||^2 misjudges layers (it
made a planner squeeze the wrong layers to 2 bits). The error is therefore weighted by the diagonal
(empirical) Fisher information of the loss with respect to the layer's output, measured once by one
backward pass over the damage windows:

    F_i[d]  = mean over tokens t of (d NLL / d y_t[d])^2
    D(i, o) = 1/2 * mean over tokens t of sum_d F_i[d] * delta_t[d]^2

D(i, o) is a second-order estimate of the increase in mean token NLL (nats) from quantizing layer i alone
with option o, so the sum over layers predicts a plan's log-perplexity increase (docs/RESULTS.md shows
how well, against measured perplexity); the `optimal` planner minimises that sum under a budget. The
error itself is measured, not modelled: error feedback (GPTQ), partial groups and outliers are all in it.
The layer score (higher = more important) is the damage of the cheapest option, so `lwq` can rank by it.

Cost: one forward and backward pass over `damage_windows` windows (a subset of the calibration windows),
then per layer one run per option on those windows (the stream itself advances on all of them). GPTQ
options collect the layer's Hessians once, on the same subset.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.driver import LayerStep, layer_output
from layerwise.importance.base import SCORERS, LayerScorer
from layerwise.models import decoder_layers, linear_modules, set_submodule
from layerwise.types import QuantSpec, parse_options

DEFAULT_OPTIONS = "2:128,3:128,4:128,8:128"
DEFAULT_DAMAGE_WINDOWS = 32


@SCORERS.register("sensitivity")
class SensitivityScorer(LayerScorer):
    name: ClassVar[str] = "sensitivity"
    needs_activations: ClassVar[bool] = True
    provides_option_damage: ClassVar[bool] = True

    def __init__(
        self,
        options: str | list[str] | list[QuantSpec] = DEFAULT_OPTIONS,
        method: str = "rtn",
        damage_windows: int = DEFAULT_DAMAGE_WINDOWS,
    ) -> None:
        if isinstance(options, list) and options and isinstance(options[0], QuantSpec):
            self.options: list[QuantSpec] = list(options)  # type: ignore[arg-type]
        else:
            self.options = parse_options(options, default_method=method)  # type: ignore[arg-type]
        self.damage_windows = damage_windows
        self._damage: dict[str, list[float]] = {o.option(): [] for o in self.options}
        self._fisher: list[torch.Tensor] = []

    def prepare(self, model: nn.Module, windows: torch.Tensor | None, batch_size: int) -> None:
        assert windows is not None
        self._fisher = output_fisher(model, windows[: self.damage_windows], batch_size)

    @torch.inference_mode()
    def score_layer(self, step: LayerStep, outputs: list[torch.Tensor] | None) -> float:
        # Local imports: the applier imports the quantizers, which need not load for other scorers.
        from layerwise.applier import collect_hessians, needs_hessian
        from layerwise.quant import quantize_module

        assert outputs is not None
        per_batch = step.inputs[0].shape[0]
        n = min(len(step.inputs), -(-self.damage_windows // per_batch))  # batches covering damage_windows
        subset = LayerStep(step.index, step.name, step.layer, step.inputs[:n], step.call)
        reference = outputs[:n]
        modules = linear_modules(step.layer)
        hessians: dict[str, torch.Tensor] = {}
        if any(needs_hessian(o) for o in self.options):
            hessians = collect_hessians(subset, modules)
        fisher = self._fisher[step.index].to(reference[0].device, torch.float64)
        n_tokens = sum(y.shape[0] * y.shape[1] for y in reference)
        for option in self.options:
            quantized = {
                name: quantize_module(m, option, hessians.get(name) if needs_hessian(option) else None)
                for name, m in modules.items()
            }
            with _swapped(step.layer, quantized):
                weighted = sum(
                    float(((layer_output(step.layer(x, *step.call.args, **step.call.kwargs)) - y).double() ** 2
                           * fisher).sum())
                    for x, y in zip(subset.inputs, reference, strict=True)
                )
            self._damage[option.option()].append(0.5 * weighted / n_tokens)
        cheapest = min(self.options, key=lambda o: (o.bits, -o.group_size))
        return self._damage[cheapest.option()][-1]

    def option_damage(self) -> dict[str, list[float]]:
        return self._damage


def output_fisher(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Per decoder layer, the mean over tokens of the squared gradient of the NLL w.r.t. its output.

    One forward and backward pass over `windows`; parameters do not get gradients (only the hidden
    states do), and every hook and flag is restored afterwards.
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    sums = [torch.zeros(()) for _ in layers]
    n_tokens = 0
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def make_input_require_grad(module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}

    def keep_grad(index: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            def accumulate(grad: torch.Tensor) -> None:
                sums[index] = sums[index] + grad.detach().float().pow(2).sum(dim=(0, 1)).cpu()

            layer_output(output).register_hook(accumulate)

        return hook

    handles = [layers[0].register_forward_pre_hook(make_input_require_grad, with_kwargs=True)]
    handles += [layer.register_forward_hook(keep_grad(i)) for i, layer in enumerate(layers)]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                       reduction="sum")
                loss.backward()
                n_tokens += batch.shape[0] * batch.shape[1]
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return [s / n_tokens for s in sums]


class _swapped:
    """Put quantized modules into a layer for the duration of a `with` block, then restore the originals."""

    def __init__(self, layer: nn.Module, replacements: dict[str, nn.Module]) -> None:
        self.layer = layer
        self.replacements = replacements
        self.originals = {name: layer.get_submodule(name) for name in replacements}

    def __enter__(self) -> None:
        for name, module in self.replacements.items():
            set_submodule(self.layer, name, module)

    def __exit__(self, *exc: object) -> None:
        for name, module in self.originals.items():
            set_submodule(self.layer, name, module)
