"""Planners turn layer scores and a budget into a `Plan`. Registered by name in `PLANNERS`.

This module is where the registry is complete: it defines `lwq` and imports `optimal` (each planner
registers itself; `layerwise.planning.base` holds the base class, the registry and the checks).

`lwq` is the seed paper's layer-wise quantization ("Layer-Wise Quantization: A Pragmatic and
Effective Method for Quantizing LLMs Beyond Integer Bit-Levels", Dumitru et al., 2024): rank layers
by importance, give the top ones the high bit width and the rest the low one, with as many layers
high as the budget allows.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import ClassVar

from layerwise.core.budget import average_bits
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerAction, LayerScores, LinearShapes, Plan, QuantSpec
from layerwise.planning.base import PLANNERS, Planner, check_planner_accepts, check_planner_takes, planner_config
from layerwise.planning.optimal import OptimalConfig, OptimalPlanner

__all__ = [
    "PLANNERS", "LwqConfig", "LwqPlanner", "OptimalConfig", "OptimalPlanner", "Planner", "check_planner_accepts",
    "check_planner_takes",
    "layer_order", "make_plan", "planner_config", "uniform_plan",
]

ORDERS = ("importance", "reverse", "random")


@dataclass(frozen=True)
class LwqConfig:
    """Two-width plan. Give either `bits` (average budget incl. overhead) or `n_low` (layers at low width)."""

    bits: float | None = None
    high: int = 4
    low: int = 2
    group_size: int = 128
    sym: bool = False
    method: str | None = None
    order: str = "importance"
    seed: int = 0
    n_low: int | None = None

    def __post_init__(self) -> None:
        QuantSpec(self.high, self.group_size)  # validates widths and group size
        QuantSpec(self.low, self.group_size)
        if self.high <= self.low:
            raise LayerwiseError(f"--high ({self.high}) must be larger than --low ({self.low})")
        if self.order not in ORDERS:
            raise LayerwiseError(f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}")
        if (self.bits is None) == (self.n_low is None):
            raise LayerwiseError("give a budget in average bits (--bits) or a number of low-width layers, not both")


def layer_order(scores: LayerScores, order: str, seed: int = 0) -> list[int]:
    """Layer indices from the one that most deserves the high width to the one that least does."""
    ranking = scores.ranking()
    if order == "reverse":
        return ranking[::-1]
    if order == "random":
        shuffled = list(range(scores.n_layers))
        random.Random(seed).shuffle(shuffled)
        return shuffled
    return ranking


def _two_width_actions(order: list[int], n_high: int, config: LwqConfig) -> list[LayerAction]:
    high = set(order[:n_high])
    return [
        LayerAction(
            i, "quantize", config.high if i in high else config.low, config.group_size, config.method, config.sym
        )
        for i in range(len(order))
    ]


@PLANNERS.register("lwq")
class LwqPlanner(Planner):
    """The seed paper's two-width plan: the most important layers at `high` bits, the rest at `low`."""

    name: ClassVar[str] = "lwq"
    Config: ClassVar[type[LwqConfig]] = LwqConfig
    requires: ClassVar[frozenset[str]] = frozenset()  # the per-layer scores every scorer gives

    def plan(self, scores: LayerScores, config: LwqConfig) -> Plan:
        n = scores.n_layers
        order = layer_order(scores, config.order, config.seed)
        shapes = scores.linear_shapes

        def cost(n_high: int) -> float:
            return average_bits(_two_width_actions(order, n_high, config), shapes)

        if config.n_low is not None:
            if not 0 <= config.n_low <= n:
                raise LayerwiseError(f"n_low must be between 0 and the number of layers ({n}), got {config.n_low}")
            n_high = n - config.n_low
        else:
            assert config.bits is not None
            lowest, highest = cost(0), cost(n)
            if config.bits < lowest - 1e-9:
                raise LayerwiseError(
                    f"budget {config.bits} bits is below what {config.low}-bit group-{config.group_size} reaches "
                    f"({lowest:.4f} bits per weight with scale/zero overhead); lower --low or raise --bits"
                )
            if config.bits > highest + 1e-9:
                raise LayerwiseError(
                    f"budget {config.bits} bits is above the high width: all layers at {config.high}-bit "
                    f"group-{config.group_size} cost {highest:.4f} bits; raise --high or lower --bits"
                )
            # Cost grows with every layer moved to the high width, so the largest feasible count is closest.
            n_high = max(k for k in range(n + 1) if cost(k) <= config.bits + 1e-9)
        actions = _two_width_actions(order, n_high, config)
        return Plan(
            layers=actions,
            target_bits=config.bits,
            avg_bits=average_bits(actions, shapes),
            made_by={"planner": "lwq", "scorer": scores.scorer, "model": scores.model, **asdict(config)},
        )


def uniform_plan(
    shapes: list[LinearShapes], bits: int, group_size: int = 128, *, sym: bool = False, method: str | None = None
) -> Plan:
    """Every decoder layer at the same width: the baseline every mixed plan is compared with."""
    actions = [LayerAction(i, "quantize", bits, group_size, method, sym) for i in range(len(shapes))]
    return Plan(layers=actions, target_bits=None, avg_bits=average_bits(actions, shapes),
                made_by={"planner": "uniform", "bits": bits, "group_size": group_size, "sym": sym, "method": method})


def make_plan(
    scores: LayerScores,
    bits: float | None = 3.25,
    *,
    planner: str | None = None,
    high: int | None = None,
    low: int | None = None,
    group_size: int | None = None,
    sym: bool | None = None,
    method: str | None = None,
    order: str | None = None,
    seed: int | None = None,
    n_low: int | None = None,
    options: str | list[str] | None = None,
    granularity: str | None = None,
) -> Plan:
    """Turn scores and a budget (average bits per decoder weight, overhead included) into a plan.

    `lwq` takes `high`, `low`, `group_size`, `sym`, `method`, `order`, `seed`, `n_low` (defaults: its
    `LwqConfig`); `optimal` takes `options` (e.g. ``"2:128,3:128,4:128,8:128"``; default: every option the
    scores measured), `method` (the method of options that name none) and `granularity` (what gets one option
    each: ``layer``, ``module`` or ``fused``; default: as finely as the scores were measured). None means "not
    given": the planner's default applies, and an argument given to a planner that does not take it is refused.
    `planner` defaults to `optimal` when the scores carry measured damage per option, else `lwq`.
    """
    from layerwise.core.validate import check_numbers

    check_numbers(bits=bits, high=high, low=low, group_size=group_size, seed=seed, n_low=n_low)
    planner_cls = PLANNERS.get(planner or ("optimal" if scores.option_damage else "lwq"))
    if method is not None:
        from layerwise.quant import QUANTIZERS

        QUANTIZERS.get(method)
    values = dict(bits=bits, high=high, low=low, group_size=group_size, sym=sym, method=method, order=order,
                  seed=seed, n_low=n_low, options=options, granularity=granularity)
    config = planner_config(planner_cls, **{k: v for k, v in values.items() if v is not None})
    return planner_cls().plan(scores, config)
