"""Measured damage of tying a decoder layer to an earlier one (reusing layer j - d's weights at layer j).

Layer tying (sharing one set of weights between several layer positions) saves the tied layer's
weights; what it costs depends on how differently the two layers treat the same input. For layer j
with its inputs x_j from the unmodified model (the layer stream), its output y_j = L_j(x_j), and each
offset d = 1..`max_offset`, layer j is run again on the same inputs and with its own call arguments
(masks, rotary embeddings) but with the weights of layer j - d, giving y_j^(d):

    damage(j, d) = mean over windows w of ||y_j^(d) - y_j||^2 / ||y_j - x_j||^2

(squared norms over all tokens and hidden dimensions of the window): the error relative to the change
the layer itself makes. 0 when the two layers hold the same weights; 1 is an error as large as the
layer's own change. A layer that changes nothing (denominator 0) gets inf, or 0 if the tie changes
nothing either. The weights are swapped with `torch.func.functional_call` on layer j, so the run is
layer j's own module (its attention type, e.g. gemma3's sliding or global) with layer j - d's
parameters, which is what a tied model computes at position j.

`tie_damage[str(d)][j]` holds damage(j, d): NaN where j - d < 0 (no such layer), inf where the two
layers' parameters differ in names or shapes (they cannot be tied). `scores[j]` is damage(j, 1), higher
= more important (harder to replace by its predecessor); layer 0, which has no predecessor, gets the
largest score of the other layers so that it ranks as most important.

Cost: `max_offset` extra runs of each layer on the first `windows` calibration windows.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call

from layerwise.core import dist
from layerwise.core.summation import exact_total
from layerwise.importance.base import SCORERS, LayerScorer
from layerwise.model.adapter import decoder_layers
from layerwise.model.driver import LayerStep
from layerwise.model.layer_calls import layer_output

DEFAULT_MAX_OFFSET = 3
# 16 windows x 512 tokens: each offset costs one more run of every layer on them, and the ratio of two
# squared norms summed over 300 k values per window varies little from window to window.
DEFAULT_WINDOWS = 16


def tieable(a: nn.Module, b: nn.Module) -> bool:
    """Whether two layers hold parameters of the same names and shapes."""
    shapes = {n: p.shape for n, p in a.named_parameters()}
    return shapes == {n: p.shape for n, p in b.named_parameters()}


def relative_error(tied: torch.Tensor, own: torch.Tensor, inputs: torch.Tensor) -> float:
    """||tied - own||^2 / ||own - inputs||^2 in float64 (inf or 0 when the layer changes nothing)."""
    error = exact_total((tied.double() - own.double()).pow(2))
    change = exact_total((own.double() - inputs.double()).pow(2))
    if change == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / change


@SCORERS.register("tie")
class TieScorer(LayerScorer):
    name: ClassVar[str] = "tie"
    needs_activations: ClassVar[bool] = True
    provides: ClassVar[frozenset[str]] = frozenset({"scores", "tie_damage"})
    layer_local: ClassVar[bool] = False  # runs layer j with earlier layers' weights
    shares_windows: ClassVar[bool] = True  # per-window errors, summed exactly over the ranks' windows

    def __init__(self, max_offset: int = DEFAULT_MAX_OFFSET, windows: int = DEFAULT_WINDOWS) -> None:
        if max_offset < 1 or windows < 1:
            raise ValueError(f"max_offset and windows must be positive, got {max_offset} and {windows}")
        self.max_offset = max_offset
        self.windows = windows
        self._layers: nn.ModuleList | None = None
        self._damage: dict[str, list[float]] = {str(d): [] for d in range(1, max_offset + 1)}

    def splits_windows(self, model: nn.Module) -> bool:
        return dist.shareable(self.windows)  # else every rank reads the few windows whole

    def windows_needed(self) -> int:
        return self.leading_windows(self.windows)

    def prepare(self, model: nn.Module, windows: torch.Tensor | None, batch_size: int) -> None:
        self._layers = decoder_layers(model)

    @torch.inference_mode()
    def score_layer(self, step: LayerStep, outputs: list[torch.Tensor] | None) -> float:
        assert outputs is not None and self._layers is not None
        per_batch = step.inputs[0].shape[0]
        n_batches = min(len(step.inputs), -(-self.windows_needed() // per_batch))  # batches covering them
        for d in range(1, self.max_offset + 1):
            self._damage[str(d)].append(self._tie_damage(step, outputs[:n_batches], step.index - d))
        return self._damage["1"][-1]

    def _tie_damage(self, step: LayerStep, outputs: list[torch.Tensor], source: int) -> float:
        assert self._layers is not None
        if source < 0:
            return math.nan
        if not tieable(step.layer, self._layers[source]):
            return math.inf
        weights = dict(self._layers[source].named_parameters())
        if self.placement is not None:  # layer j is on the device; layer j - d is home
            weights = {name: self.placement.place(p) for name, p in weights.items()}
        errors: list[float] = []
        for x, y in zip(step.inputs, outputs, strict=False):
            tied = layer_output(functional_call(step.layer, weights, (x, *step.call.args), step.call.kwargs))
            errors += [relative_error(t, own, inp) for t, own, inp in zip(tied, y, x, strict=True)]
        rows = [[error, 1.0] for error in errors[: self.windows_needed()]]
        total, count = dist.exact_sums(rows, 2, self.sharded)
        return total / count

    def finish(self, scores: list[float]) -> list[float]:
        if len(scores) > 1:
            scores[0] = max(scores[1:])
        return scores

    def tie_damage(self) -> dict[str, list[float]]:
        return self._damage
