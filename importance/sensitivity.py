"""Measured sensitivity: what quantizing one layer alone, with each candidate option, does to its output.

For decoder layer i with full-precision input x (from the unmodified model) and output y = f_i(x), and
each option o (bits x group size x method), the layer's linears are quantized with o and the layer is run
again on the same inputs, giving y_o. The damage is the relative error that lands in the residual stream:

    D(i, o) = sum ||y_o - y||^2 / sum ||y||^2          (over every token of the damage windows)

It is measured, not modelled: error feedback (GPTQ), partial groups and outliers are all in it. Summed
over layers it predicts the damage of a whole plan (docs/RESULTS.md shows how well, against measured
perplexity); the `optimal` planner minimises that sum under a budget. The layer score (higher = more
important) is the damage of the cheapest option, so `lwq` can rank by it too.

Cost: per layer, one run per option on `damage_windows` windows (a subset of the calibration windows;
the stream itself advances on all of them). GPTQ options collect the layer's Hessians once, on the same
subset.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from layerwise.driver import LayerStep, layer_output
from layerwise.importance.base import SCORERS, LayerScorer
from layerwise.models import linear_modules, set_submodule
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

    @torch.inference_mode()
    def score_layer(self, step: LayerStep, outputs: list[torch.Tensor] | None) -> float:
        # Local imports: the applier imports the quantizers, which need not load for other scorers.
        from layerwise.applier import collect_hessians, needs_hessian
        from layerwise.quant import quantize_module

        assert outputs is not None
        n = min(self.damage_windows, len(step.inputs))
        subset = LayerStep(step.index, step.name, step.layer, step.inputs[:n], step.call)
        reference = outputs[:n]
        modules = linear_modules(step.layer)
        hessians: dict[str, torch.Tensor] = {}
        if any(needs_hessian(o) for o in self.options):
            hessians = collect_hessians(subset, modules)
        denominator = sum(float(y.double().pow(2).sum()) for y in reference)
        for option in self.options:
            quantized = {
                name: quantize_module(m, option, hessians.get(name) if needs_hessian(option) else None)
                for name, m in modules.items()
            }
            with _swapped(step.layer, quantized):
                error = sum(
                    float((layer_output(step.layer(x, *step.call.args, **step.call.kwargs)) - y).double().pow(2).sum())
                    for x, y in zip(subset.inputs, reference, strict=True)
                )
            self._damage[option.option()].append(error / denominator)
        cheapest = min(self.options, key=lambda o: (o.bits, -o.group_size))
        return self._damage[cheapest.option()][-1]

    def option_damage(self) -> dict[str, list[float]]:
        return self._damage


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
