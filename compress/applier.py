"""Apply a `Plan` to a model: swap each decoder linear for the `QuantLinear` its action asks for."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from layerwise.errors import LayerwiseError
from layerwise.models import decoder_layers, linear_modules, linear_weight, set_submodule
from layerwise.quant import QUANTIZERS, quantize_module, relative_error
from layerwise.types import Plan, QuantSpec


@dataclass
class LayerOutcome:
    """What applying one layer's action did: the spec of every module and its relative weight error."""

    layer: int
    specs: dict[str, QuantSpec | None] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    sq_norms: dict[str, float] = field(default_factory=dict)  # ||W||_F^2 of each quantized module

    def layer_error(self) -> float | None:
        """Relative error of the layer's quantized linears taken together: ||W - Q(W)||_F / ||W||_F."""
        total = sum(self.sq_norms.values())
        if not total:
            return None
        return (sum(self.errors[n] ** 2 * self.sq_norms[n] for n in self.errors) / total) ** 0.5


def check_plan_fits(plan: Plan, model: nn.Module) -> None:
    n_layers = len(decoder_layers(model))
    if plan.n_layers != n_layers:
        raise LayerwiseError(
            f"the plan covers {plan.n_layers} layers but the model has {n_layers}; "
            "make the plan from this model's scores (layerwise score / layerwise plan)"
        )
    unsupported = sorted({a.action for a in plan.layers} - {"keep", "quantize"})
    if unsupported:
        raise LayerwiseError(
            f"plan actions {unsupported} cannot be applied yet; this version applies keep and quantize"
        )
    methods = {spec.method for a in plan.layers for spec in _action_specs(a)}
    for method in methods:
        QUANTIZERS.get(method)  # unknown method -> error naming the choices


def _action_specs(action) -> list[QuantSpec]:
    base = action.spec()
    return [s for s in [base, *action.overrides.values()] if s is not None]


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Plan, method: str = "rtn", *, progress: bool = True) -> list[LayerOutcome]:
    """Quantize `model` in place as `plan` says; `method` fills actions that name none."""
    QUANTIZERS.get(method)
    check_plan_fits(plan, model)
    outcomes = []
    layers = decoder_layers(model)
    for action, layer in zip(plan.layers, tqdm(layers, desc="quantizing", disable=not progress, unit="layer"),
                             strict=True):
        outcome = LayerOutcome(action.layer)
        for name, module in linear_modules(layer).items():
            spec = action.module_spec(name, default_method=method)
            outcome.specs[name] = spec
            if spec is None:
                continue
            weight = linear_weight(module).detach()
            qlinear = quantize_module(module, spec)
            outcome.errors[name] = relative_error(weight, qlinear)
            outcome.sq_norms[name] = float(weight.double().pow(2).sum())
            set_submodule(layer, name, qlinear)
        outcomes.append(outcome)
    return outcomes


def resolve_methods(plan: Plan, method: str) -> Plan:
    """A copy of `plan` with `method` written into every quantize action that names none (what was applied)."""
    layers = [
        replace(a, method=method) if a.action == "quantize" and a.method is None else replace(a) for a in plan.layers
    ]
    return replace(plan, layers=layers)
