"""The `optimal` planner: one option per unit, minimising the summed measured damage under a budget.

A unit is a decoder layer, or at a finer `granularity` one linear module or one of vLLM's fused sets
(`layerwise.core.types.module_units`). Given, for every unit i and candidate option o, a measured damage
D(i, o) (the `sensitivity` scorer) and a storage cost C(i, o) in bits (codes plus scale/zero overhead,
`QuantSpec.storage_bits`), choose o_i for every unit to

    minimise  sum_i D(i, o_i)   subject to   sum_i C(i, o_i) <= budget_bits.

Units are measured one at a time, so the sum takes their damages as additive (per module, the error of
one module interacting with another's is left out). This is a multiple-choice knapsack. It is solved
exactly by dynamic programming over units that keeps only the Pareto frontier of partial plans (no other
partial plan is both cheaper and less damaging); partial plans that cannot be completed within the
budget are dropped. Frontiers stay small because units share a few shapes, so the number of distinct
costs grows polynomially, not exponentially (210 units of the default model: seconds). The same
formulation appears as the integer program of "Improving Post Training Neural Quantization: Layer-wise
Calibration and Integer Programming" (Hubara et al., 2021).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from layerwise.core.budget import n_weights
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import (
    LayerAction,
    LayerScores,
    LinearShapes,
    Plan,
    QuantSpec,
    check_granularity,
    module_units,
    unit_name,
)
from layerwise.planning.base import PLANNERS, Planner


@dataclass(frozen=True)
class OptimalConfig:
    """A budget in average bits (required), the options to choose from, and what gets one option each."""

    bits: float | None = None
    options: tuple[QuantSpec, ...] | None = None  # None: every option the scores measured
    # `GRANULARITIES`: one option per layer, per module, or per module with vLLM's fused sets together.
    # None: as finely as the scores were measured (`LayerScores.module_damage`, else per layer).
    granularity: str | None = None

    def __post_init__(self) -> None:
        if self.bits is None:
            raise LayerwiseError("planner 'optimal' needs a budget: give --bits")
        if self.options is not None and not all(isinstance(o, QuantSpec) for o in self.options):
            raise LayerwiseError("the optimal planner's options must be QuantSpecs (parse them with parse_options)")
        if self.granularity is not None:
            check_granularity(self.granularity)


def _unit_cost(shapes: LinearShapes, unit: tuple[str, ...], spec: QuantSpec) -> int:
    return sum(spec.fit(shapes[name][1]).storage_bits(*shapes[name]) for name in unit)


def _measured_granularity(scores: LayerScores) -> str:
    """``layer`` when the scores hold no module damage, else the granularity its units were measured at."""
    if not scores.module_damage:
        return "layer"
    fused = any("+" in unit for layer in scores.module_damage for unit in layer)
    return "fused" if fused else "module"


def _unit_damage(measured: dict[str, dict[str, float]], unit: tuple[str, ...], option: str, layer: int,
                 granularity: str) -> float:
    """The damage of quantizing `unit` alone with `option`: measured for it, or summed over measured parts."""
    name = unit_name(unit)
    if name in measured:
        return measured[name][option]
    if all(part in measured for part in unit):
        return sum(measured[part][option] for part in unit)
    raise LayerwiseError(
        f"granularity {granularity!r} plans {name} of layer {layer} as one unit, and the scores measured "
        f"{', '.join(measured) or 'no modules'}; score again with granularity {granularity} (or module)")


def solve(costs: list[list[int]], damages: list[list[float]], budget: int) -> tuple[list[int], float, int]:
    """Exact minimum-damage choice of one option per layer with total cost <= budget.

    Returns (option index per layer, total damage, total cost). Ties in damage go to the cheaper plan.
    """
    n_layers = len(costs)
    min_rest = [0] * (n_layers + 1)
    for i in range(n_layers - 1, -1, -1):
        min_rest[i] = min_rest[i + 1] + min(costs[i])
    # Each frontier entry: (cost, damage, index of the parent entry in the previous frontier, option).
    frontiers: list[list[tuple[int, float, int, int]]] = []
    previous: list[tuple[int, float, int, int]] = [(0, 0.0, -1, -1)]
    for i in range(n_layers):
        candidates = [
            (cost + c, damage + d, parent, o)
            for parent, (cost, damage, _, _) in enumerate(previous)
            for o, (c, d) in enumerate(zip(costs[i], damages[i], strict=True))
            if cost + c + min_rest[i + 1] <= budget
        ]
        candidates.sort(key=lambda e: (e[0], e[1]))
        frontier: list[tuple[int, float, int, int]] = []
        for entry in candidates:
            if not frontier or entry[1] < frontier[-1][1]:
                frontier.append(entry)
        frontiers.append(frontier)
        previous = frontier
    best = min(range(len(previous)), key=lambda k: (previous[k][1], previous[k][0]))
    total_cost, total_damage = previous[best][0], previous[best][1]
    choice = [0] * n_layers
    for i in range(n_layers - 1, -1, -1):
        _, _, parent, option = frontiers[i][best]
        choice[i] = option
        best = parent
    return choice, total_damage, total_cost


@PLANNERS.register("optimal")
class OptimalPlanner(Planner):
    """The least summed measured damage under the budget, one option per layer or finer unit (`solve`)."""

    name: ClassVar[str] = "optimal"
    Config: ClassVar[type[OptimalConfig]] = OptimalConfig
    requires: ClassVar[frozenset[str]] = frozenset({"option_damage"})

    def plan(self, scores: LayerScores, config: OptimalConfig) -> Plan:
        assert config.bits is not None  # OptimalConfig refuses a missing budget
        if not scores.option_damage:
            raise LayerwiseError(
                f"the optimal planner needs measured damage per option, which scorer {scores.scorer!r} does not "
                "provide; score with --scorer sensitivity"
            )
        measured = {label: QuantSpec.parse_option(label) for label in scores.option_damage}
        options = list(config.options) if config.options else list(measured.values())
        missing = [o.option() for o in options if o.option() not in scores.option_damage]
        if missing:
            raise LayerwiseError(
                f"options {', '.join(missing)} were not measured by the scorer (measured: "
                f"{', '.join(scores.option_damage)}); score again with --options including them"
            )
        shapes = scores.linear_shapes
        granularity = config.granularity or _measured_granularity(scores)
        if granularity != "layer" and not scores.module_damage:
            raise LayerwiseError(
                f"granularity {granularity!r} needs damage measured per module, and these scores were measured per "
                f"layer; score with granularity {granularity} (or plan with granularity layer)")
        # The items of the knapsack: each (layer, unit of its modules) gets one option.
        items = [(i, unit) for i in range(scores.n_layers)
                 for unit in module_units(list(shapes[i]), granularity)]
        costs = [[_unit_cost(shapes[i], unit, o) for o in options] for i, unit in items]
        if granularity == "layer":
            damages = [[scores.option_damage[o.option()][i] for o in options] for i, _ in items]
        else:
            damages = [[_unit_damage(scores.module_damage[i], unit, o.option(), i, granularity) for o in options]
                       for i, unit in items]
        total_weights = sum(n_weights(s) for s in shapes)
        budget = int(config.bits * total_weights)
        cheapest = sum(min(c) for c in costs) / total_weights
        richest = sum(max(c) for c in costs) / total_weights
        labels = ", ".join(o.option() for o in options)
        if budget < sum(min(c) for c in costs):
            raise LayerwiseError(
                f"budget {config.bits} bits is below the cheapest option: every layer at its cheapest of "
                f"{labels} costs {cheapest:.4f} bits per weight; raise --bits or add a cheaper option"
            )
        if config.bits > richest + 1e-9:
            raise LayerwiseError(
                f"budget {config.bits} bits is above the richest option: every layer at its richest of {labels} "
                f"costs {richest:.4f} bits per weight; lower --bits or add a richer option (e.g. 8:128)"
            )
        choice, damage, cost = solve(costs, damages, budget)
        chosen: list[dict[str, QuantSpec]] = [{} for _ in range(scores.n_layers)]
        for (i, unit), o in zip(items, choice, strict=True):
            chosen[i].update(dict.fromkeys(unit, options[o]))
        made_by = {"planner": "optimal", "scorer": scores.scorer, "model": scores.model, "bits": config.bits,
                   "options": [o.option() for o in options]}
        if granularity != "layer":  # absent for per-layer plans, which read as they did before granularities
            made_by["granularity"] = granularity
        return Plan(
            layers=[_action(i, chosen[i], shapes[i]) for i in range(scores.n_layers)],
            target_bits=config.bits,
            avg_bits=cost / total_weights,
            made_by={**made_by, "predicted_damage": damage},
        )


def _action(layer: int, specs: dict[str, QuantSpec], shapes: LinearShapes) -> LayerAction:
    """A quantize action giving each module its spec: the one covering the most weights as the layer's spec,
    the others as overrides."""
    weights: dict[QuantSpec, int] = {}
    for name, spec in specs.items():
        weights[spec] = weights.get(spec, 0) + shapes[name][0] * shapes[name][1]
    main = max(weights, key=lambda spec: weights[spec])
    action = LayerAction.quantized(layer, main)
    action.overrides = {name: spec for name, spec in specs.items() if spec != main}
    return action
