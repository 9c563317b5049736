"""Scorer interface and the one-pass runner that feeds every scorer from a single layer stream."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any, ClassVar

import torch
from torch import nn

from layerwise.core import dist
from layerwise.core.registry import Registry
from layerwise.core.types import LayerScores
from layerwise.model.adapter import layer_linear_shapes
from layerwise.model.driver import LayerStep, LayerWeights, each_layer, stream_layers
from layerwise.model.placement import Placement, oom_as_error

# The optional outputs a scorer may provide beyond "scores": each a `LayerScorer` method and a
# `LayerScores` field of the same name.
SCORE_OUTPUTS = ("module_scores", "option_damage", "block_distance", "tie_damage", "module_damage")


class LayerScorer:
    """Scores decoder layers one at a time; higher always means more important.

    Subclasses set `name`, say whether they read activations (`needs_activations`), and implement
    `score_layer`. A scorer that reads activations gets the layer's inputs and outputs on the
    calibration windows; a weight-only scorer gets `outputs=None` and no calibration pass is run.
    A scorer that reads the calibration windows only through whole-model forwards in `prepare` sets
    `needs_stream = False`: when no scorer of a pass needs it, the layer stream is not run.
    `provides` names what the scorer fills in its `LayerScores` (each an optional method below, plus
    the per-layer `scores` every scorer gives); planners declare what they need of it (`Planner.requires`).
    """

    name: ClassVar[str]
    needs_activations: ClassVar[bool] = True  # reads the calibration windows
    needs_stream: ClassVar[bool] = True  # ...through the layer stream (step inputs and outputs)
    # What the scorer's `LayerScores` carries: "scores" always, plus each of `SCORE_OUTPUTS` it fills.
    provides: ClassVar[frozenset[str]] = frozenset({"scores"})
    # Reads one decoder layer's weights at a time and nothing from the whole model, so it can score a
    # model streamed from disk (layerwise.engine.streaming). False for scorers that run whole-model forwards or
    # backward passes in `prepare`, or read other layers' weights in `score_layer`.
    layer_local: ClassVar[bool] = True
    progress: bool = True  # set by `score_model`: whether the scorer may show progress bars of its own
    # Set by `score_model`: where whole-model work in `prepare` runs (None: where the model is). The
    # layer steps arrive already on that device (`LayerStep.placement`).
    placement: Placement | None = None
    # Under a process group (`layerwise.core.dist`): whether the scorer sums what it measures over the ranks,
    # so that each rank can read only its share of the windows. A pass whose readers all do is sharded.
    shares_windows: ClassVar[bool] = False
    sharded: bool = False  # set by `score_model`: this pass reads this rank's share of the windows

    @classmethod
    def parameters(cls) -> set[str]:
        """The keyword arguments the scorer's constructor takes."""
        import inspect

        return set(inspect.signature(cls).parameters)

    def splits_windows(self, model: nn.Module) -> bool:
        """Whether, in a process group, this scorer reads only this rank's share of the windows (and sums what it
        measures over the ranks) rather than all of them: `shares_windows`, unless the scorer splits its work
        another way for this model."""
        return self.shares_windows

    def leading_windows(self, n: int) -> int:
        """How many of the windows this pass reads hold the first `n` of the whole set: `n` alone, this rank's
        part of them when the pass is sharded (windows are dealt round-robin)."""
        return dist.local_count(n) if self.sharded else n

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

    def module_damage(self) -> list[dict[str, dict[str, float]]]:
        """Optional measured damage per layer, unit of modules (`layerwise.core.types.module_units`) and option."""
        return []

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
    model whose layers are not in memory (`layerwise.engine.streaming`); every scorer must then be `layer_local`.
    `placement` runs each layer's step on its device in its dtype (`layerwise.model.placement`), and the
    scorers' whole-model passes layer by layer there.
    """
    scorer_options = scorer_options or {}
    instances = [SCORERS.get(name)(**scorer_options.get(name, {})) for name in scorers]
    readers = [s for s in instances if s.needs_activations]
    _check_inputs(scorers, instances, windows, weights)
    start = time.perf_counter()
    sharded = (windows is not None and bool(readers) and not dist.is_alone()
               and all(s.splits_windows(model) for s in readers))
    for scorer in instances:  # before trimming: a sharded scorer counts the windows it needs in this rank's share
        scorer.progress = progress
        scorer.placement = placement
        scorer.sharded = sharded
    if sharded:
        assert windows is not None
        windows = dist.shard(windows)
    if windows is not None:
        windows = _windows_for(readers, windows)
    for scorer in instances:
        scorer.prepare(model, windows, batch_size)
    values = _score_layers(model, scorers, instances, windows, batch_size, progress, weights, placement)
    seconds = time.perf_counter() - start
    calib = dict(calibration or {}) if readers else {}
    if calib and windows is not None:  # what was read, after trimming to the scorers' needs (by every rank)
        count = int(dist.sum_floats([windows.shape[0]])[0]) if sharded else int(windows.shape[0])
        calib.update(windows=count, tokens=count * int(windows.shape[1]))
    return _layer_scores(model, instances, values, model_name, calib, seconds)


def _check_inputs(scorers: list[str], instances: list[LayerScorer], windows: torch.Tensor | None,
                  weights: LayerWeights | None) -> None:
    """Refuse a pass its scorers cannot run: no windows for one that reads them, a streamed model for one
    that needs the whole model."""
    if any(s.needs_activations for s in instances) and windows is None:
        raise ValueError(f"scorers {scorers} need calibration windows")
    if weights is not None:
        whole = [s.name for s in instances if not s.layer_local]
        if whole:
            raise ValueError(f"scorers {whole} need the whole model in memory; they cannot score a streamed model")


def _score_layers(model: nn.Module, scorers: list[str], instances: list[LayerScorer], windows: torch.Tensor | None,
                  batch_size: int, progress: bool, weights: LayerWeights | None,
                  placement: Placement | None) -> dict[str, list[float]]:
    """One pass over the decoder layers, each scorer scoring each layer; every scorer's finished scores.

    The layer stream (each layer run on its inputs) runs only when some scorer reads it (`needs_stream`),
    on the windows those scorers read; otherwise the layers are visited without running them.
    """
    streamers = [s for s in instances if s.needs_activations and s.needs_stream]
    if streamers:
        assert windows is not None
        steps = stream_layers(model, _windows_for(streamers, windows), batch_size=batch_size, progress=progress,
                              desc=f"scoring ({', '.join(scorers)})", weights=weights, placement=placement)
    else:
        steps = each_layer(model, progress=progress, desc="scoring", weights=weights, placement=placement)
    values: dict[str, list[float]] = {s.name: [] for s in instances}
    for step in steps:
        with oom_as_error("scoring", step.index, placement):
            with ExitStack() as observing:
                for scorer in instances:
                    observing.enter_context(scorer.observe(step))
                outputs = step.run() if streamers else None
            step.outputs = outputs
            for scorer in instances:
                values[scorer.name].append(float(scorer.score_layer(step, outputs)))
    return {s.name: [float(v) for v in s.finish(values[s.name])] for s in instances}


def _layer_scores(model: nn.Module, instances: list[LayerScorer], values: dict[str, list[float]], model_name: str,
                  calib: dict[str, Any], seconds: float) -> dict[str, LayerScores]:
    """Each scorer's `LayerScores`: its scores and whatever else it gathered (see `LayerScorer.provides`)."""
    shapes = layer_linear_shapes(model)
    return {
        s.name: LayerScores(
            scorer=s.name,
            scores=values[s.name],
            linear_shapes=shapes,
            model=model_name,
            calibration=calib if s.needs_activations else {},
            seconds=seconds,
            **{output: getattr(s, output)() for output in SCORE_OUTPUTS},
        )
        for s in instances
    }


def _windows_for(scorers: list[LayerScorer], windows: torch.Tensor) -> torch.Tensor:
    """The leading windows that cover what `scorers` read (all of them if any reads all)."""
    wanted = [s.windows_needed() for s in scorers]
    if not wanted or None in wanted:
        return windows
    return windows[: max(n for n in wanted if n is not None)]
