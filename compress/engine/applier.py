"""Apply a `Plan` to a model: change its structure (prune, drop, tie), then swap each decoder linear for
the `QuantLinear` its action asks for."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from torch import nn

from layerwise.core import dist
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import DEFAULT_GRID, LayerOutcome, Plan, QuantSpec, check_grid
from layerwise.model.adapter import decoder_layers, linear_modules, linear_shape, linear_weight, set_submodule
from layerwise.model.driver import LayerStep, LayerWeights, each_layer, stream_layers
from layerwise.model.placement import Placement, oom_as_error
from layerwise.quant import (
    QUANTIZERS,
    QuantLinear,
    SharedInputHessians,
    dense_weights,
    empty_quantized,
    quantize_modules,
    relative_error,
    squared_norm,
    stored_tensors,
)
from layerwise.quant.gptq import checked_hessians
from layerwise.quant.hessian import AsymmetricHessian
from layerwise.quant.registry import (  # noqa: F401  (the engine's names for them)
    method_needs_hessian,
    needs_hessian,
    needs_reference_inputs,
)


def check_plan_fits(plan: Plan, model: nn.Module) -> None:
    """Refuse a plan made for another model (layer count, tied shapes) or naming unknown methods."""
    layers = decoder_layers(model)
    if plan.n_layers != len(layers):
        raise LayerwiseError(
            f"the plan covers {plan.n_layers} layers but the model has {len(layers)}; "
            "make the plan from this model's scores (layerwise score / layerwise plan)"
        )
    ties = [(a.layer, a.tie_to) for a in plan.layers if a.action == "tie"]
    if ties:
        from layerwise.prune import check_tie

        for layer, to in ties:
            check_tie(model, layer, to)
    methods = {spec.method for a in plan.layers for spec in _action_specs(a)}
    for method in methods:
        QUANTIZERS.get(method)  # unknown method -> error naming the choices


def apply_structure(model: nn.Module, plan: Plan, tie_mode: str = "first") -> Plan:
    """Drop sub-layers, tie and prune layers in place as `plan` says; returns the plan for the result.

    `plan` numbers the model's current layers; the returned plan numbers the layers that remain
    (`Plan.compact`). With `tie_mode="average"` each representative first takes the mean weights of
    the layers tied to it. Everything is checked before the model is touched.
    """
    from layerwise.prune import average_layers, drop_sublayer, remove_layers, tie_layer

    check_plan_fits(plan, model)
    runs: dict[int, list[int]] = {}
    for action in plan.layers:
        if action.action == "tie":
            assert action.tie_to is not None
            runs.setdefault(action.tie_to, [action.tie_to]).append(action.layer)
    for action in plan.layers:
        for sublayer in action.drop:
            drop_sublayer(model, action.layer, sublayer)
    for representative, members in runs.items():
        if tie_mode == "average":
            average_layers(model, members, into=representative)
        for member in members[1:]:
            tie_layer(model, member, representative)
    remove_layers(model, [a.layer for a in plan.layers if a.action == "prune"])
    return plan.compact()


def retie(model: nn.Module, plan: Plan, representative: int) -> None:
    """Share `representative`'s (now quantized) modules again with the layers tied to it."""
    tied = [a.layer for a in plan.layers if a.action == "tie" and a.tie_to == representative]
    if not tied:
        return
    from layerwise.prune import tie_layer

    for layer in tied:
        tie_layer(model, layer, representative)


def _action_specs(action) -> list[QuantSpec]:
    base = action.spec()
    return [s for s in [base, *action.overrides.values()] if s is not None]


def plan_needs_calibration(plan: Plan, method: str) -> bool:
    """True when some module's method (GPTQ) reads calibration activations."""
    return any(
        needs_hessian(action.module_spec(name, default_method=method))
        for action in plan.layers
        for name in ["", *action.overrides]
    )


def plan_needs_reference(plan: Plan, method: str) -> bool:
    """True when some module's method (GPTAQ) also reads the full-precision model's inputs."""
    return any(
        needs_reference_inputs(action.module_spec(name, default_method=method))
        for action in plan.layers
        for name in ["", *action.overrides]
    )


def _layer_steps(
    model: nn.Module,
    windows: torch.Tensor | None,
    batch_size: int,
    progress: bool,
    weights: LayerWeights | None = None,
    start: int = 0,
    hidden: list[torch.Tensor] | None = None,
    placement: Placement | None = None,
    reference: bool = False,
    reference_hidden: list[torch.Tensor] | None = None,
) -> Iterator[LayerStep]:
    if windows is not None:
        yield from stream_layers(model, windows, batch_size=batch_size, progress=progress, desc="quantizing",
                                 weights=weights, start=start, hidden=hidden, placement=placement,
                                 reference=reference, reference_hidden=reference_hidden)
        return
    yield from each_layer(model, progress=progress, desc="quantizing", weights=weights, start=start,
                          placement=placement)


def collect_hessians(step: LayerStep, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Run the layer once on its (already compressed upstream) inputs, collecting each module's Hessian.

    Modules that read the same input tensor (q/k/v, gate/up) get the same Hessian object.
    """
    if not modules:
        return {}
    with SharedInputHessians(modules) as collector:
        step.run()
    return checked_hessians(step.index, collector)


@torch.inference_mode()
def collect_paired(step: LayerStep, modules: dict[str, nn.Module],
                   cross: set[str]) -> dict[str, torch.Tensor | AsymmetricHessian]:
    """Run the float layer on both streams, one batch of each at a time; set the step's `reference_outputs`.

    Per batch, the full-precision stream's run records every module's input and gives the batch's
    reference output; the quantized stream's run then accumulates H, and for the modules in `cross` (and
    those sharing their input) the cross term against the recorded inputs, which are dropped before the
    next batch. Returns each module's Hessian as `collect_hessians` does, an `AsymmetricHessian` for `cross`.
    """
    assert step.reference is not None
    collector = SharedInputHessians(modules, cross=cross)
    outputs = []
    # A layer tied to one quantized before it holds QuantLinears: dense once here, as for `step.run`.
    with dense_weights(step.layer.modules()):
        for reference, hidden in zip(step.reference, step.inputs, strict=True):
            with collector.reference_pass():
                outputs.append(step.keep(step.forward(reference)))
            if modules:
                with collector:
                    step.forward(hidden)
    step.reference_outputs = step.kept(outputs)
    return checked_hessians(step.index, collector) if modules else {}


@torch.no_grad()
def apply_plan(
    model: nn.Module,
    plan: Plan,
    method: str = "rtn",
    *,
    windows: torch.Tensor | None = None,
    batch_size: int = 1,
    progress: bool = True,
    weights: LayerWeights | None = None,
    start: int = 0,
    hidden: list[torch.Tensor] | None = None,
    on_layer: Callable[[LayerStep, LayerOutcome], None] | None = None,
    placement: Placement | None = None,
    reference_hidden: list[torch.Tensor] | None = None,
    grid: str = DEFAULT_GRID,
) -> list[LayerOutcome]:
    """Quantize `model` in place as `plan` says; `method` and `grid` fill actions that name none.

    Methods that read activations (GPTQ) run layer-sequentially: each layer is calibrated on the
    outputs of the already-quantized layers before it, one layer's activations in memory at a time.
    Streaming (`layerwise.engine.streaming`) passes the layers' `weights`, may resume at layer `start` with
    its saved inputs `hidden`, and gets each finished layer through `on_layer(step, outcome)` (the
    step's `outputs` are then the next layer's inputs, when calibrating) before the layer is released.
    With a `placement` each layer is calibrated and quantized on its device and is home again (its
    `QuantLinear` buffers included, floating ones in the model's dtype) before `on_layer` sees it.

    Methods that also read the full-precision model's inputs (GPTAQ, `needs_reference_inputs`) make the
    driver carry that model's hidden states too: each layer runs with its float weights on them before it
    is quantized (`collect_paired`), giving its modules' cross terms and the next layer's reference inputs
    (the step's `reference_outputs`; a resumed run passes them saved as `reference_hidden`). The reference
    is the model as restructured (pruned, dropped, tied); a layer tied to an earlier one runs that
    layer's already quantized weights on it, since the float ones are gone by then.
    Returns the outcomes of the layers quantized in this call.
    """
    QUANTIZERS.get(method)
    check_grid(grid)
    check_plan_fits(plan, model)
    if any(a.action == "prune" for a in plan.layers):
        raise LayerwiseError("the plan prunes layers: apply its structure first (apply_structure) and pass the "
                             "plan it returns")
    calibrated = plan_needs_calibration(plan, method)
    referenced = plan_needs_reference(plan, method)
    if calibrated and windows is None:
        raise LayerwiseError("the plan uses a method that reads calibration data (gptq); pass calibration windows")
    outcomes = []
    for step in _layer_steps(model, windows if calibrated else None, batch_size, progress, weights, start, hidden,
                             placement, referenced, reference_hidden):
        with oom_as_error("quantizing", step.index, placement):
            action = plan.layers[step.index]
            modules = linear_modules(step.layer)
            specs = {name: _fitted(action.module_spec(name, default_method=method, default_grid=grid), module)
                     for name, module in modules.items()}
            calibrating = {n: m for n, m in modules.items() if needs_hessian(specs[n])}
            if referenced:
                cross = {n for n in calibrating if needs_reference_inputs(specs[n])}
                hessians = collect_paired(step, calibrating, cross)
            else:
                hessians = collect_hessians(step, calibrating)
            del calibrating
            outcome = LayerOutcome(action.layer, specs=specs)
            names = [name for name in modules if specs[name] is not None]
            errors, sq_norms = _quantize_layer(step.layer, {n: modules.pop(n) for n in names}, specs, hessians)
            del modules, hessians  # the float weights and Hessians are gone now: only the quantized layer is left
            outcome.errors = {name: errors[name] for name in names}
            outcome.sq_norms = {name: sq_norms[name] for name in names}
            if names:
                retie(model, plan, step.index)
            if calibrated:  # the next layer's inputs, through this layer as now quantized
                with dense_weights(step.layer.modules()):
                    step.outputs = step.run()
        step.release()  # with a placement: the quantized layer goes home before the next one comes
        if on_layer is not None:
            on_layer(step, outcome)
        outcomes.append(outcome)
    return outcomes


def send_quantized_layers(model: nn.Module, plan: Plan, outcomes: list[LayerOutcome]) -> None:
    """After rank 0 quantized `model` by `plan` alone (`apply_plan` in `dist.on_main`), give the other ranks,
    whose layers are still float, the same quantized layers: each makes the empty `QuantLinear`s of every layer's
    `outcomes` (their specs), ties them as `apply_plan` does, and receives their stored tensors from rank 0, one
    message per layer."""
    main = dist.is_main()
    for index, (layer, outcome) in enumerate(zip(decoder_layers(model), outcomes, strict=True)):
        names = [name for name, spec in outcome.specs.items() if spec is not None]
        if not main:
            modules = linear_modules(layer)
            for name in names:
                set_submodule(layer, name, empty_quantized(modules[name], outcome.specs[name]))  # type: ignore[arg-type]
            if names:
                retie(model, plan, index)
        tensors = [t for m in layer.modules() if isinstance(m, QuantLinear) for t in stored_tensors(m)]
        dist.broadcast_from_owners(tensors, [0] * len(tensors))


def _fitted(spec: QuantSpec | None, module: nn.Module) -> QuantSpec | None:
    """The spec with the group size the module really gets (`QuantSpec.fit`), so the outcome records it."""
    return None if spec is None else spec.fit(linear_shape(module)[1])


def _quantize_layer(layer: nn.Module, modules: dict[str, nn.Module], specs: dict[str, QuantSpec | None],
                    hessians: dict[str, torch.Tensor | AsymmetricHessian]) -> tuple[dict[str, float], dict[str, float]]:
    """Swap each of `modules` (emptied as it goes) for its quantized version; each one's error and ||W||^2.

    Modules are quantized a Hessian at a time (q/k/v, then o, gate/up, down on a llama), each group's
    Hessian and float weights dropped as soon as it is done, so that at most one group's quantization
    temporaries and the Hessians still to use are in memory with the layer (not every Hessian, every
    float weight and every quantized copy at once). Groups are independent: the result is the same.
    In a process group the groups are instead dealt among the ranks in one call
    (`_quantize_layer_across_ranks`), each rank holding the layer's Hessians and float weights until every
    group is done.
    """
    if not dist.is_alone():
        return _quantize_layer_across_ranks(layer, modules, specs, hessians)
    groups: dict[int, list[str]] = {}
    for name in modules:
        hessian = hessians.get(name)
        groups.setdefault(id(hessian) if hessian is not None else -len(groups) - 1, []).append(name)
    errors: dict[str, float] = {}
    sq_norms: dict[str, float] = {}
    for group in groups.values():
        jobs = [(modules[name], specs[name], hessians.pop(name, None)) for name in group]
        quantized = quantize_modules(jobs, across_ranks=True)  # type: ignore[arg-type]
        del jobs
        for name, qlinear in zip(group, quantized, strict=True):
            weight = linear_weight(modules.pop(name)).detach()
            errors[name] = relative_error(weight, qlinear)
            sq_norms[name] = squared_norm(weight)
            set_submodule(layer, name, qlinear)
            del weight
        del quantized
    return errors, sq_norms


def _quantize_layer_across_ranks(
    layer: nn.Module, modules: dict[str, nn.Module], specs: dict[str, QuantSpec | None],
    hessians: dict[str, torch.Tensor | AsymmetricHessian],
) -> tuple[dict[str, float], dict[str, float]]:
    """`_quantize_layer` in a process group: the layer's quantizations dealt among the ranks in one call, then
    each module's error and ||W||^2 measured by one rank (dealt by size, or all by rank 0 with every rank's
    threads when the ranks share one machine's cores) and sent to the others."""
    names = list(modules)
    quantized = quantize_modules([(modules[n], specs[n], hessians.pop(n, None)) for n in names],  # type: ignore[misc]
                                 across_ranks=True)
    weights = [linear_weight(modules.pop(n)).detach() for n in names]
    pooled = bool(weights) and dist.pools_threads(weights[0].device)
    owners = [0] * len(weights) if pooled else dist.deal([float(w.numel()) for w in weights])

    def measure(i: int) -> list[torch.Tensor]:
        return [torch.tensor([relative_error(weights[i], quantized[i]), squared_norm(weights[i])], dtype=torch.float64)]

    measured = [m for m, in dist.from_owners(owners, measure, lambda i: [torch.zeros(2, dtype=torch.float64)],
                                             pooled=pooled)]
    for name, qlinear in zip(names, quantized, strict=True):
        set_submodule(layer, name, qlinear)
    return ({n: float(m[0]) for n, m in zip(names, measured, strict=True)},
            {n: float(m[1]) for n, m in zip(names, measured, strict=True)})


def resolve_methods(plan: Plan, method: str, grid: str = DEFAULT_GRID) -> Plan:
    """A copy of `plan` with `method` (and `grid`) written into every quantize action that names none: what
    was applied. The default grid is not written, so a plan applied without a grid is stored as before."""
    def resolved(a):
        if a.action != "quantize":
            return replace(a)
        fill_grid = a.grid is None and grid != DEFAULT_GRID
        return replace(a, method=a.method or method, grid=grid if fill_grid else a.grid)

    return replace(plan, layers=[resolved(a) for a in plan.layers])
