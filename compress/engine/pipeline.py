"""The one compression pipeline: `run(recipe, source, sink)`.

    check ─ open ─ calibrate ─ structure ─ (rotate) ─ score ─ plan ─ quantize ─ report ─ write

Every run, in memory or streamed from disk, goes through these phases in this code; the source
(`layerwise.engine.sources`: a resident model, or safetensors read one layer at a time) and the sink
(`layerwise.engine.sinks`: memory, or a resumable work directory) are the only differences. Everything that
can be refused (names, budget, what a source cannot do, the output) is refused before the first slow
phase. Each phase is announced by name and timed on its own (`Report.metrics["phase_seconds"]`).

The rotate phase runs only when the recipe asks for it (`Recipe.rotate`): after the structure is decided
(so pruned layers are not rotated for nothing) and before scoring and planning, so the damage measured is
the damage to the rotated model. ``rotate="auto"`` (the default of `compress`) is decided when the model is
open, by `resolve_rotation`, and the recipe recorded in the checkpoint holds the decision.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from layerwise.core import dist
from layerwise.core.budget import average_bits, n_weights
from layerwise.core.errors import LayerwiseError
from layerwise.core.progress import PhaseClock
from layerwise.core.types import (
    LayerAction,
    LayerOutcome,
    LayerScores,
    LinearShapes,
    Plan,
    module_units,
    parse_options,
    unit_name,
)
from layerwise.data.corpora import calibration_windows
from layerwise.engine.applier import (
    apply_plan,
    apply_structure,
    check_plan_fits,
    plan_needs_calibration,
    plan_needs_reference,
    resolve_methods,
    send_quantized_layers,
)
from layerwise.engine.recipe import Recipe
from layerwise.engine.sinks import MemorySink, WorkDirSink
from layerwise.engine.sources import ResidentSource, StreamedSource, check_source
from layerwise.engine.streaming import PARTIAL_FORMAT, PARTIAL_VERSION, replay_inputs
from layerwise.importance import SCORERS, score_model
from layerwise.importance.sensitivity import DEFAULT_OPTIONS
from layerwise.model.adapter import decoder_layers, layer_linear_shapes, layers_path
from layerwise.model.device import resolve_device, resolve_dtype
from layerwise.model.placement import Placement, placement_for
from layerwise.output.report import Report, build_report
from layerwise.planning.planners import PLANNERS, check_planner_accepts, check_planner_takes, make_plan, uniform_plan
from layerwise.planning.structure import plan_structure
from layerwise.quant import QUANTIZERS
from layerwise.quant.registry import method_needs_hessian, needs_hessian
from layerwise.transform import AUTO, RotationConfig, RotationRecord, auto_rotation, check_rotatable, rotate_model

Source = ResidentSource | StreamedSource
Sink = MemorySink | WorkDirSink


@dataclass
class CompressResult:
    model: nn.Module
    tokenizer: Any
    plan: Plan
    scores: LayerScores | None
    report: Report
    recipe: Recipe | None = None
    rotation: RotationRecord | None = None  # what `Recipe.rotate` applied (None: no rotation)


@dataclass
class _Run:
    """What the phases of one run hand to each other."""

    recipe: Recipe
    source: Source
    sink: Sink
    clock: PhaseClock
    shapes: list[LinearShapes] = field(default_factory=list)
    windows: torch.Tensor | None = None
    calib_summary: dict[str, Any] = field(default_factory=dict)
    structure_plan: Plan | None = None
    compacted: Plan | None = None
    scores: LayerScores | None = None
    placement: Placement | None = None
    device: torch.device | None = None
    rotation: RotationRecord | None = None


def resolve(recipe: Recipe) -> Recipe:
    """The recipe with its defaults decided and every name checked: planner (`optimal` for scorers that
    measure damage per option, else `lwq`), the options such a planner reads (`DEFAULT_OPTIONS`)."""
    QUANTIZERS.get(recipe.method)
    if recipe.plan is not None:
        for method in {a.method for a in recipe.plan.layers if a.method} | {o.method for a in recipe.plan.layers
                                                                           for o in a.overrides.values()}:
            QUANTIZERS.get(method)
        return recipe
    scorer_cls = SCORERS.get(recipe.scorer)
    planner = recipe.planner or ("optimal" if "option_damage" in scorer_cls.provides else "lwq")
    for name in set(recipe.structure.scorers(recipe.prune_scorer).values()):
        SCORERS.get(name)
    if not recipe.quantizing and recipe.structure.empty and recipe.rotate in (None, AUTO):
        raise LayerwiseError("nothing to do: give a budget (bits), uniform bits, a structural change (prune, "
                             "drop_attn, drop_mlp, tie) or a rotation (rotate)")
    planner_cls = PLANNERS.get(planner)
    if recipe.scoring:
        check_planner_accepts(planner_cls, scorer_cls)
        # Here, not only when planning: after a structural change that is after every score is measured.
        check_planner_takes(planner_cls, [name for name, _ in recipe.planner_args])
    resolved = replace(recipe, planner=planner)
    if "options" in planner_cls.arguments() and recipe.arg("options") is None:
        resolved = resolved.with_args(options=GGUF_OPTIONS if recipe.target == "gguf" else DEFAULT_OPTIONS)
    if recipe.target == "vllm" and recipe.arg("granularity") == "module":
        resolved = resolved.with_args(granularity="fused")  # vLLM runs one scheme per fused q/k/v and gate/up
    if recipe.target == "gguf" and recipe.arg("granularity") is None and "granularity" in planner_cls.arguments():
        # llama.cpp holds a type per tensor, and per layer the measured allocation lost to llama.cpp's own
        # rules (docs/RESULTS.md): per module it wins.
        resolved = resolved.with_args(granularity="module")
    check_target_options(resolved)
    return resolved


# The options of `--target gguf`: llama.cpp's k-quants and q8_0, each at its real bits per weight.
GGUF_OPTIONS = "q2_k,q3_k,q4_k,q5_k,q6_k,q8_0"
TARGETS = ("gguf", "vllm")


def check_target_options(recipe: Recipe) -> None:
    """A target's options: llama.cpp types for gguf (others would be rounded again on export), none for vllm."""
    if recipe.target is None:
        return
    if recipe.target not in TARGETS:
        raise LayerwiseError(f"unknown target {recipe.target!r}; choose one of {', '.join(TARGETS)}")
    options = recipe.arg("options")
    specs = parse_options(options, recipe.method) if options else []
    if recipe.target == "gguf":
        wrong = [s.option() for s in specs if s.gguf is None]
        if wrong or recipe.uniform is not None:
            raise LayerwiseError(
                f"--target gguf quantizes to llama.cpp types, and {', '.join(wrong) or '--uniform'} is not one; "
                f"use --options from {GGUF_OPTIONS}")
    else:
        wrong = [s.option() for s in specs if s.gguf is not None]
        if wrong:
            raise LayerwiseError(f"--target vllm cannot load llama.cpp types ({', '.join(wrong)}); use integer "
                                 "options such as 4:128")


def run(recipe: Recipe, source: Source, sink: Sink, *, calib: torch.Tensor | None = None,
        scores: LayerScores | None = None, progress: bool = True) -> CompressResult:
    """Compress `source` as `recipe` says into `sink`.

    `calib` gives token windows instead of the recipe's calibration text; `scores`, with a recipe whose
    plan is given, are the scores that plan was made from (shown in the report).
    """
    device = dist.local_device(resolve_device(recipe.device))
    group = dist.init_from_environment(device)  # first: a refusal is then said once for the group
    recipe = resolve(recipe)
    check_source(source, recipe)
    if group is not None:
        dist.agree("arguments", {**recipe.compared(), "model": source.name})
        progress = progress and group.main
    sink.check()
    state = _Run(recipe, source, sink, PhaseClock(progress), scores=scores, device=device)
    try:
        with state.clock.phase("load", source.name if isinstance(source, StreamedSource) else ""):
            state.placement = open_placed(source, device, recipe.dtype)
            if group is not None:
                dist.agree("model weights", weights_digest(source.model))
        recipe = state.recipe = resolve_rotation(recipe, source)
        if recipe.plan is not None:
            check_plan_fits(recipe.plan, source.model)
        if recipe.rotation is not None:
            check_rotatable(source.model, recipe.rotation)
            _warn_rotation_without_hessian(recipe)
        state.shapes = layer_linear_shapes(source.model)
        recipe.structure.check(len(state.shapes))
        _budget_dry_run(state)
        with state.clock.phase("calibrate"):
            if group is None:
                _calibrate(state, calib)
            else:
                _calibrate_group(state, calib)
        sink.start(_run_info(state))
        return _compress(state, progress)
    except BaseException as exc:
        sink.failed(exc)
        raise
    finally:
        sink.close()


# What `weights_digest` reads of each tensor: `DIGEST_RUNS` runs of `DIGEST_RUN` contiguous values, evenly spaced.
# Enough to tell other model files apart (a fine-tune or another revision changes a matrix everywhere), at a
# cost that does not grow with the model; contiguous runs touch a few pages of a tensor where the same number
# of values read one by one across it touch every page (twice as slow on the default model).
DIGEST_RUNS, DIGEST_RUN = 16, 256


def weights_digest(model: nn.Module) -> list[Any]:
    """A cheap fingerprint of the model's weights that ranks compare: each tensor's name, shape, dtype and the
    sha256 of `DIGEST_RUNS` runs of its values, evenly spaced (all of them in a small tensor)."""
    digest = []
    for name, p in model.state_dict().items():
        if p.device.type == "meta":
            continue
        flat = p.detach().reshape(-1)
        runs = flat if flat.numel() <= DIGEST_RUNS * DIGEST_RUN else \
            flat.unfold(0, DIGEST_RUN, flat.numel() // DIGEST_RUNS)[:DIGEST_RUNS]
        sample = runs.contiguous().cpu()
        data = sample.view(torch.uint8) if sample.numel() else sample
        digest.append((name, list(p.shape), str(p.dtype), hashlib.sha256(data.numpy().tobytes()).hexdigest()))
    return digest


def resolve_rotation(recipe: Recipe, source: Source) -> Recipe:
    """The recipe with ``rotate="auto"`` decided for the open model: R1 + R2 (``hadamard``) when every
    method the run quantizes with reads a Hessian (rotation was measured to hurt RTN, docs/rotation.md),
    the architecture allows R1 and the head is not tied to the embedding (`layerwise.transform.auto_rotation`),
    and the model is in memory (a streamed run cannot rotate yet: it says so and goes on without);
    otherwise no rotation."""
    if recipe.rotate != AUTO:
        return recipe
    chosen = None
    if recipe.quantizing and all(method_needs_hessian(m) for m in _methods(recipe)):
        chosen = auto_rotation(source.model)
        if chosen is not None and not _rotatable(source.model, chosen):
            chosen = None
        if chosen is not None and not source.resident:
            warnings.warn(f"{getattr(source, 'why', 'streaming')} cannot rotate yet, so this run does not "
                          "(rotation lowers GPTQ/GPTAQ perplexity: compress with --no-stream for it)", stacklevel=2)
            chosen = None
    return replace(recipe, rotate=chosen)


def _rotatable(model: nn.Module, rotate: str) -> bool:
    """Whether `rotate` applies to this model as it is (e.g. no linears rotation cannot place)."""
    try:
        check_rotatable(model, RotationConfig.parse(rotate))
    except LayerwiseError:
        return False
    return True


def _methods(recipe: Recipe) -> set[str]:
    """Every quantization method the run can use: the recipe's, the options' and the given plan's."""
    methods = {recipe.method}
    if recipe.plan is not None:
        methods |= {a.method for a in recipe.plan.layers if a.action == "quantize" and a.method}
        methods |= {o.method for a in recipe.plan.layers for o in a.overrides.values()}
    options = recipe.arg("options")
    if options is not None:
        methods |= {spec.method for spec in parse_options(options, recipe.method)}
    return methods


def _warn_rotation_without_hessian(recipe: Recipe) -> None:
    """Rotation helps methods that read a Hessian; with RTN it was measured to hurt (docs/rotation.md)."""
    if recipe.quantizing and not method_needs_hessian(recipe.method):
        warnings.warn(f"rotation with --method {recipe.method} (no Hessian) was measured to raise perplexity "
                      "a lot on models with massive activations (docs/rotation.md); rotate with --method gptq "
                      "or gptaq", stacklevel=2)


def open_placed(source: Source, device: str | torch.device, dtype: str | None) -> Placement | None:
    """Open `source` in the dtype a run on `device` uses (`dtype`, else the default for that device);
    the run's placement (None: the CPU in float32)."""
    device = resolve_device(device)
    resolved = resolve_dtype(dtype, device, source.checkpoint_dtype())
    source.open(resolved)
    return placement_for(device, resolved)


def _compress(state: _Run, progress: bool) -> CompressResult:
    recipe, source, sink, clock = state.recipe, state.source, state.sink, state.clock
    with clock.phase("structure", ", ".join(sorted(set(recipe.structure.scorers(recipe.prune_scorer).values())))):
        _structure(state, progress)
    if recipe.rotation is not None:
        with clock.phase("rotate", recipe.rotation.name()):
            state.rotation = rotate_model(source.model, recipe.rotation, state.device)
    with clock.phase("score", recipe.scorer if recipe.scoring else "none needed"):
        if recipe.scoring:
            state.scores = sink.cached_scores() or _score(state, progress)
            sink.save_scores(state.scores)
    with clock.phase("plan", recipe.planner if recipe.scoring else ""):
        plan, quantized = _plan(state)
        sink.save_plan(plan)
    with clock.phase("quantize", recipe.method if recipe.quantizing else "(structure only)"):
        outcomes = _quantize(state, plan, quantized, progress)
    applied = resolve_methods(plan, recipe.method, recipe.grid)
    report = build_report(source.model, applied, outcomes, state.shapes, model_name=source.name,
                          original_element_bytes=source.element_bytes, scores=state.scores)
    _timings(report, clock, streamed=not sink.keeps_model)
    if state.rotation is not None:
        report.metrics["rotation"] = state.rotation.describe()
    extra: dict[str, Any] = {"recipe": recipe.to_dict(), "report": report.to_dict()}
    if state.scores is not None:
        extra["scores"] = state.scores.to_dict()
    if state.rotation is not None:
        extra["rotation"] = state.rotation.to_dict()
    with clock.phase("write", str(sink.out) if sink.out is not None else "in memory"):
        sink.write(source.model, source.tokenizer, applied, extra, source)
    model = source.model if sink.keeps_model else None
    return CompressResult(model, source.tokenizer, applied, state.scores, report, recipe,  # type: ignore[arg-type]
                          state.rotation)


def _timings(report: Report, clock: PhaseClock, streamed: bool) -> None:
    seconds = clock.seconds
    report.metrics["phase_seconds"] = dict(seconds)
    if "score" in seconds and seconds["score"] and report.scorer is not None:
        report.metrics["score_seconds"] = seconds["score"]
    report.metrics["quantize_seconds"] = seconds.get("quantize", 0.0)
    report.metrics["compress_seconds"] = round(sum(seconds.values()), 2)
    if streamed:
        report.metrics["streamed"] = True


def _budget_dry_run(state: _Run) -> None:
    """Plan once with zero scores, so an impossible budget is refused before any slow phase."""
    recipe = state.recipe
    if not (recipe.scoring and recipe.structure.empty):
        return
    zeros = [0.0] * len(state.shapes)
    options = recipe.arg("options")
    labels = [o.option() for o in parse_options(options, recipe.method)] if options else []
    granularity = recipe.arg("granularity", "layer")
    units = [{unit_name(u): dict.fromkeys(labels, 0.0) for u in module_units(list(s), granularity)}
             for s in state.shapes] if granularity != "layer" else []
    scores = LayerScores("budget-check", zeros, state.shapes, option_damage=dict.fromkeys(labels, zeros),
                         module_damage=units)
    _make_plan(recipe, scores, recipe.bits)


def _make_plan(recipe: Recipe, scores: LayerScores, bits: float | None) -> Plan:
    args = dict(recipe.planner_args)
    if recipe.method is not None and "method" not in args:
        args["method"] = recipe.method
    return make_plan(scores, bits, planner=recipe.planner, **args)


def _needs_calibration(recipe: Recipe) -> bool:
    if recipe.plan is not None:
        return plan_needs_calibration(recipe.plan, recipe.method)
    scorer_reads = recipe.scoring and SCORERS.get(recipe.scorer).needs_activations
    options = parse_options(recipe.arg("options"), recipe.method) if recipe.arg("options") and recipe.scoring else []
    hessian = recipe.quantizing and (method_needs_hessian(recipe.method) or any(needs_hessian(o) for o in options))
    return bool(recipe.structure.scorers(recipe.prune_scorer)) or scorer_reads or hessian


def _calibrate(state: _Run, calib: torch.Tensor | None) -> None:
    """Tokenize the calibration text once: every scorer and the quantizer read the same windows."""
    recipe = state.recipe
    if not _needs_calibration(recipe):
        return
    reader = f"method {recipe.method!r}" if recipe.plan is not None else f"{recipe.scorer!r} with {recipe.method!r}"
    c = recipe.calibration
    state.windows, state.calib_summary = calibration(state.source.tokenizer, c.corpus if calib is None else calib,
                                                     c.windows, c.length, reader)


def _calibrate_group(state: _Run, calib: torch.Tensor | None) -> None:
    """`_calibrate` in a process group: rank 0 tokenizes the calibration text and sends every rank the windows;
    windows a caller gave each rank are compared instead. Refuses too few windows to share, before any slow
    phase."""
    if calib is None:
        if dist.is_main():
            _calibrate(state, None)
        state.windows, state.calib_summary = dist.from_main((state.windows, state.calib_summary))
    else:
        _calibrate(state, calib)
        dist.agree("calibration windows", _sha256(state.windows))
    if state.windows is not None:
        dist.check_shareable(state.windows.shape[0])


def calibration(tokenizer: Any, calib: str | torch.Tensor, n_windows: int, window_len: int,
                reader: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Calibration token windows and a summary of where they came from (stored with scores and plans)."""
    if isinstance(calib, torch.Tensor):
        windows, corpus = calib, "token windows given by the caller"
    elif tokenizer is None:
        raise LayerwiseError(f"{reader} reads calibration text: pass tokenizer= with the model")
    else:
        windows, corpus = calibration_windows(tokenizer, calib, n_windows, window_len), calib
    summary = {"corpus": corpus, "windows": int(windows.shape[0]), "window_len": int(windows.shape[1]),
               "tokens": int(windows.numel())}
    return windows, summary


def _run_info(state: _Run) -> dict[str, Any]:
    """What a resumed run must match: the recipe, the calibration tokens and the model files."""
    info: dict[str, Any] = {"format": PARTIAL_FORMAT, "version": PARTIAL_VERSION, "model": state.source.name,
                            "args": {**state.recipe.compared(), "calib_tokens_sha256": _sha256(state.windows)},
                            "torch_threads": torch.get_num_threads()}
    if isinstance(state.source, StreamedSource):
        info["source"] = state.source.fingerprint()
    return info


def _sha256(windows: torch.Tensor | None) -> str | None:
    if windows is None:
        return None
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _structure(state: _Run, progress: bool) -> None:
    """Score what the structural choices need in one pass, plan them, and apply them to the model."""
    recipe, model = state.recipe, state.source.model
    n_layers = len(state.shapes)
    structure_plan = recipe.plan or Plan([LayerAction(i, "keep") for i in range(n_layers)])
    scorers = recipe.structure.scorers(recipe.prune_scorer)
    if scorers:
        results = score_model(model, sorted(set(scorers.values())), state.windows, model_name=state.source.name,
                              calibration=state.calib_summary, progress=progress, placement=state.placement)
        actions = plan_structure(len(decoder_layers(model)), recipe.structure,
                                 **{f"{role}_scores": results[scorer] for role, scorer in scorers.items()})
        structure_plan = Plan(actions, made_by={"structure": asdict(recipe.structure), "structure_scorers": scorers})
    tie_mode = recipe.structure.tie_mode
    state.structure_plan = structure_plan
    state.compacted = apply_structure(model, structure_plan, tie_mode) if structure_plan.structural else structure_plan


def _score(state: _Run, progress: bool) -> LayerScores:
    """Score the layers left after restructuring with the recipe's scorer."""
    recipe = state.recipe
    scorer_cls = SCORERS.get(recipe.scorer)
    offered = {"options": recipe.arg("options"), "method": recipe.method, "granularity": recipe.arg("granularity")}
    kwargs = {k: v for k, v in offered.items() if k in scorer_cls.parameters() and v is not None}
    windows = state.windows if scorer_cls.needs_activations else None
    return score_model(state.source.model, [recipe.scorer], windows, model_name=state.source.name,
                       calibration=state.calib_summary, scorer_options={recipe.scorer: kwargs}, progress=progress,
                       weights=state.source.layer_weights, placement=state.placement)[recipe.scorer]


def _plan(state: _Run) -> tuple[Plan, Plan]:
    """The plan in the original numbering, and the part of it that quantizes the restructured model."""
    recipe, structure_plan, compacted = state.recipe, state.structure_plan, state.compacted
    assert structure_plan is not None and compacted is not None
    if recipe.plan is not None:
        return recipe.plan, compacted
    cached = state.sink.cached_plan()
    if cached is not None:
        return cached, cached.compact() if cached.structural else cached
    free = _free_layers(compacted)
    free_shapes = [layer_linear_shapes(state.source.model)[i] for i in free]
    if not recipe.quantizing:
        quantized = compacted
    elif recipe.uniform is not None:
        quantized = _fill(compacted, uniform_plan(free_shapes, recipe.uniform, recipe.group_size,
                                                  sym=bool(recipe.arg("sym", False)), method=recipe.method))
    else:
        assert state.scores is not None
        bits = recipe.bits
        if bits is not None and structure_plan.structural:
            bits = _free_budget(recipe, bits, state.shapes, free_shapes)
        scores = state.scores.subset(free, free_shapes)
        # Ranks that share the cores would each plan at once and slow each other down: rank 0 plans for all.
        def planned() -> Plan:
            return _make_plan(recipe, scores, bits)

        quantized = _fill(compacted, dist.on_main(planned) if _ranks_share_cores(state) else planned())
    plan = structure_plan.expand(quantized)
    plan.target_bits = recipe.bits if recipe.scoring else None
    plan.avg_bits = average_bits(plan.layers, state.shapes)
    plan.made_by = {**(quantized.made_by if recipe.quantizing else {}), **structure_plan.made_by}
    return plan, quantized


def _free_budget(recipe: Recipe, bits: float, shapes: list[LinearShapes], free_shapes: list[LinearShapes]) -> float:
    """`bits` over the original weights as average bits over the weights left to quantize.

    What pruning, tying and dropping removed is free to spend. A two-width planner cannot spend more
    than every layer at its high width costs, so the budget is capped there.
    """
    free_bits = bits * sum(map(n_weights, shapes)) / sum(map(n_weights, free_shapes))
    if "high" in PLANNERS.get(recipe.planner).arguments():
        high = recipe.arg("high", 4)
        free_bits = min(free_bits, uniform_plan(free_shapes, high, recipe.group_size,
                                                sym=bool(recipe.arg("sym", False))).avg_bits)
    return free_bits


def _free_layers(compacted: Plan) -> list[int]:
    """Layers with weights of their own to quantize: all but the tied ones."""
    return [a.layer for a in compacted.layers if a.action != "tie"]


def _fill(compacted: Plan, sub_plan: Plan) -> Plan:
    """`compacted` with its free layers' actions from `sub_plan` (numbered over the free layers only)."""
    free = _free_layers(compacted)
    layers = list(compacted.layers)
    for k, action in zip(free, sub_plan.layers, strict=True):
        layers[k] = replace(action, layer=k, drop=list(layers[k].drop))
    return replace(compacted, layers=layers, made_by=sub_plan.made_by)


def _quantize(state: _Run, plan: Plan, quantized: Plan, progress: bool):
    """Quantize the restructured model by `quantized`; outcomes in the original model's numbering."""
    recipe, source, sink = state.recipe, state.source, state.sink
    if not recipe.quantizing:
        return []
    calibrated = plan_needs_calibration(plan, recipe.method)
    n_layers = quantized.n_layers
    resumed = sink.resume_point(n_layers, calibrated, plan_needs_reference(plan, recipe.method))
    done = []
    if resumed.first < n_layers:
        if isinstance(source, StreamedSource):
            source.streamed.quantizing = True
        if not calibrated and resumed.first == 0 and isinstance(source, ResidentSource) and _ranks_share_cores(state):
            # Ranks that share the cores: rank 0 quantizes every layer on all their threads, then sends them.
            done = dist.on_main(lambda: apply_plan(
                source.model, quantized, recipe.method, progress=progress, grid=recipe.grid, placement=state.placement,
                on_layer=sink.on_layer(layers_path(source.model), n_layers, calibrated)))
            send_quantized_layers(source.model, quantized, done)
            return _renumbered(sink.outcomes(done, n_layers), plan)
        windows = dist.shard(state.windows) if calibrated and state.windows is not None else None
        if resumed.replay:
            assert windows is not None and isinstance(source, StreamedSource) and isinstance(sink, WorkDirSink)
            resumed.hidden, resumed.reference = replay_inputs(
                source.streamed, windows, quantized, recipe.method, recipe.grid, sink.work, resumed.first,
                placement=state.placement, reference=plan_needs_reference(plan, recipe.method))
        done = apply_plan(source.model, quantized, recipe.method, windows=windows,
                          progress=progress, weights=source.layer_weights, start=resumed.first, hidden=resumed.hidden,
                          on_layer=sink.on_layer(layers_path(source.model), n_layers, calibrated),
                          placement=state.placement, reference_hidden=resumed.reference, grid=recipe.grid)
        if isinstance(source, StreamedSource):
            source.streamed.quantizing = False
    return _renumbered(sink.outcomes(done, n_layers), plan)


def _ranks_share_cores(state: _Run) -> bool:
    """Whether this run's ranks share one machine's cores, so that rank 0 does alone, on all their threads, the
    work threads split well (`dist.pools_threads`)."""
    return dist.pools_threads(state.device or torch.device("cpu"))


def _renumbered(outcomes: list[LayerOutcome], plan: Plan) -> list[LayerOutcome]:
    """`outcomes` of the restructured model's layers, in the original model's numbering (for the report)."""
    kept = plan.kept_layers()
    for outcome in outcomes:
        outcome.layer = kept[outcome.layer]
    return outcomes

