"""Scorer interface and the one-pass runner that feeds every scorer from a single layer stream."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any, ClassVar

import torch
from torch import nn

from layerwise.driver import LayerStep, LayerWeights, each_layer, stream_layers
from layerwise.models import layer_linear_shapes
from layerwise.placement import Placement, oom_as_error
from layerwise.registry import Registry
from layerwise.types import LayerScores


class LayerScorer:
    """Scores decoder layers one at a time; higher always means more important.

    Subclasses set `name`, say whether they read activations (`needs_activations`), and implement
    `score_layer`. A scorer that reads activations gets the layer's inputs and outputs on the
    calibration windows; a weight-only scorer gets `outputs=None` and no calibration pass is run.
    A scorer that reads the calibration windows only through whole-model forwards in `prepare` sets
    `needs_stream = False`: when no scorer of a pass needs it, the layer stream is not run.
    """

    name: ClassVar[str]
    needs_activations: ClassVar[bool] = True  # reads the calibration windows
    needs_stream: ClassVar[bool] = True  # ...through the layer stream (step inputs and outputs)
    provides_option_damage: ClassVar[bool] = False  # fills `option_damage` (what the optimal planner reads)
    # Reads one decoder layer's weights at a time and nothing from the whole model, so it can score a
    # model streamed from disk (layerwise.streaming). False for scorers that run whole-model forwards or
    # backward passes in `prepare`, or read other layers' weights in `score_layer`.
    layer_local: ClassVar[bool] = True
    progress: bool = True  # set by `score_model`: whether the scorer may show progress bars of its own
    # Set by `score_model`: where whole-model work in `prepare` runs (None: where the model is). The
    # layer steps arrive already on that device (`LayerStep.placement`).
    placement: Placement | None = None

    def windows_needed(self) -> int | None:
        """How many of the calibration windows this scorer reads (None: all of them).

        The layer stream runs on the most any scorer needs, so a scorer that measures on a subset does
        not pay for advancing every window through every layer.
        """
        return None

    def prepare(self, model: nn.Module, windows: torch.Tensor | None, batch_size: int) -> None:
        """Optional whole-model work before the layer stream starts (e.g. one backward pass)."""

    def observe(self, step: LayerStep) -> AbstractContextManager[object]:
        """Optional context around the layer's reference run, e.g. hooks that read its modules' inputs.

        Entered just before the stream runs the (unmodified) layer on its windows, left right after;
        `score_layer` follows with the outputs.
        """
        return nullcontext()

    def score_layer(self, step: LayerStep, outputs: list[torch.Tensor] | None) -> float:
        raise NotImplementedError

    def module_scores(self) -> dict[str, list[float]]:
        """Optional per-module values gathered while scoring."""
        return {}

    def option_damage(self) -> dict[str, list[float]]:
        """Optional measured damage per quantization option (key: QuantSpec.option()) and layer."""
        return {}

    def block_distance(self) -> dict[str, list[float]]:
        """Optional distance between the hidden states entering layers l and l + n (key: str(n))."""
        return {}

    def tie_damage(self) -> dict[str, list[float]]:
        """Optional measured damage of running layer j with the weights of layer j - d (key: str(d))."""
        return {}

    def finish(self, scores: list[float]) -> list[float]:
        """Optional last word on the scores once every layer has been seen (default: unchanged)."""
        return scores


SCORERS: Registry[type[LayerScorer]] = Registry("scorer")


def score_model(
    model: nn.Module,
    scorers: list[str],
    windows: torch.Tensor | None = None,
    *,
    model_name: str = "",
    calibration: dict[str, Any] | None = None,
    scorer_options: dict[str, dict[str, Any]] | None = None,
    batch_size: int = 1,
    progress: bool = True,
    weights: LayerWeights | None = None,
    placement: Placement | None = None,
) -> dict[str, LayerScores]:
    """Run every named scorer over the model in one layer-by-layer pass; returns scores by scorer name.

    `scorer_options` maps a scorer name to keyword arguments for its constructor. `weights` streams a
    model whose layers are not in memory (`layerwise.streaming`); every scorer must then be `layer_local`.
    `placement` runs each layer's step on its device in its dtype (`layerwise.placement`), and the
    scorers' whole-model passes layer by layer there.
    """
    scorer_options = scorer_options or {}
    instances = [SCORERS.get(name)(**scorer_options.get(name, {})) for name in scorers]
    readers = [s for s in instances if s.needs_activations]
    needs_activations = bool(readers)
    streaming = any(s.needs_stream for s in readers)
    if needs_activations and windows is None:
        raise ValueError(f"scorers {scorers} need calibration windows")
    if weights is not None:
        whole = [s.name for s in instances if not s.layer_local]
        if whole:
            raise ValueError(f"scorers {whole} need the whole model in memory; they cannot score a streamed model")
    values: dict[str, list[float]] = {s.name: [] for s in instances}
    start = time.perf_counter()
    if windows is not None:
        windows = _windows_for(readers, windows)
    for scorer in instances:
        scorer.progress = progress
        scorer.placement = placement
        scorer.prepare(model, windows, batch_size)
    if streaming:
        assert windows is not None
        steps = stream_layers(model, _windows_for([s for s in readers if s.needs_stream], windows),
                              batch_size=batch_size, progress=progress, desc=f"scoring ({', '.join(scorers)})",
                              weights=weights, placement=placement)
    else:
        steps = each_layer(model, progress=progress, desc="scoring", weights=weights, placement=placement)
    for step in steps:
        with oom_as_error("scoring", step.index, placement):
            with ExitStack() as observing:
                for scorer in instances:
                    observing.enter_context(scorer.observe(step))
                outputs = step.run() if streaming else None
            step.outputs = outputs
            for scorer in instances:
                values[scorer.name].append(float(scorer.score_layer(step, outputs)))
    values = {s.name: [float(v) for v in s.finish(values[s.name])] for s in instances}
    seconds = time.perf_counter() - start
    shapes = layer_linear_shapes(model)
    calib = dict(calibration or {}) if needs_activations else {}
    if calib and windows is not None:  # what was read, after trimming to the scorers' needs
        calib.update(windows=int(windows.shape[0]), tokens=int(windows.numel()))
    return {
        s.name: LayerScores(
            scorer=s.name,
            scores=values[s.name],
            linear_shapes=shapes,
            model=model_name,
            calibration=calib if s.needs_activations else {},
            module_scores=s.module_scores(),
            option_damage=s.option_damage(),
            block_distance=s.block_distance(),
            tie_damage=s.tie_damage(),
            seconds=seconds,
        )
        for s in instances
    }


def _windows_for(scorers: list[LayerScorer], windows: torch.Tensor) -> torch.Tensor:
    """The leading windows that cover what `scorers` read (all of them if any reads all)."""
    wanted = [s.windows_needed() for s in scorers]
    if not wanted or None in wanted:
        return windows
    return windows[: max(n for n in wanted if n is not None)]
