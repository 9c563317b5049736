"""The Python API: score, plan, apply, or all three in one `compress()` call."""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from layerwise.applier import (
    apply_plan,
    apply_structure,
    check_plan_fits,
    method_needs_hessian,
    plan_needs_calibration,
    resolve_methods,
)
from layerwise.budget import average_bits, n_weights
from layerwise.data import DEFAULT_CALIB_LEN, DEFAULT_CALIB_WINDOWS, calibration_windows
from layerwise.device import check_cpu_float32
from layerwise.errors import LayerwiseError
from layerwise.importance import SCORERS, score_model
from layerwise.importance.sensitivity import DEFAULT_OPTIONS
from layerwise.loading import load_model, model_name
from layerwise.models import check_causal_lm, check_finite_weights, decoder_layers, layer_linear_shapes
from layerwise.paths import check_not_inside
from layerwise.planners import PLANNERS, uniform_plan
from layerwise.quant import QUANTIZERS
from layerwise.report import Report, build_report
from layerwise.streaming import RunArgs
from layerwise.structure import TIE_MODES, StructureConfig, plan_structure
from layerwise.types import LayerAction, LayerScores, LinearShapes, Plan, parse_options
from layerwise.validate import check_numbers

DEFAULT_MODEL = "smollm2-135m"


@dataclass
class CompressResult:
    model: nn.Module
    tokenizer: Any
    plan: Plan
    scores: LayerScores | None
    report: Report


def _resolve(model_or_path: nn.Module | str | None, tokenizer: Any) -> tuple[nn.Module, Any, str]:
    if isinstance(model_or_path, nn.Module):
        name = getattr(getattr(model_or_path, "config", None), "_name_or_path", "") or type(model_or_path).__name__
        check_causal_lm(model_or_path)
        check_finite_weights(model_or_path, name)
        return model_or_path, tokenizer, name
    model, loaded_tokenizer = load_model(model_or_path)
    check_finite_weights(model, model_name(model_or_path))
    return model, tokenizer or loaded_tokenizer, model_name(model_or_path)


def _calibration(
    tokenizer: Any, calib: str | torch.Tensor, n_windows: int, window_len: int, reader: str
) -> tuple[torch.Tensor, dict[str, Any]]:
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


def score(
    model_or_path: nn.Module | str | None = None,
    scorer: str = "lim",
    *,
    tokenizer: Any = None,
    calib: str | torch.Tensor = "wikipedia",
    calib_windows: int = DEFAULT_CALIB_WINDOWS,
    calib_len: int = DEFAULT_CALIB_LEN,
    options: str | list[str] | None = None,
    method: str = "rtn",
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LayerScores:
    """Score every decoder layer with `scorer` (see `layerwise.importance.SCORERS`).

    `calib` is a built-in corpus name, a text file, or token windows (a LongTensor [n, length]).
    `options` and `method` go to scorers that measure quantization options (`sensitivity`).
    """
    check_numbers(calib_windows=calib_windows, calib_len=calib_len)
    check_cpu_float32(device, dtype)
    scorer_cls = SCORERS.get(scorer)
    model, tokenizer, name = _resolve(model_or_path, tokenizer)
    windows, calibration = None, None
    if scorer_cls.needs_activations:
        windows, calibration = _calibration(tokenizer, calib, calib_windows, calib_len, f"scorer {scorer!r}")
    accepted = inspect.signature(scorer_cls).parameters
    kwargs = {k: v for k, v in {"options": options, "method": method}.items() if k in accepted and v is not None}
    return score_model(model, [scorer], windows, model_name=name, calibration=calibration,
                       scorer_options={scorer: kwargs}, progress=progress)[scorer]


def default_planner(provides_option_damage: bool) -> str:
    """`optimal` where the scores measured damage per option (sensitivity), else the seed's `lwq`."""
    return "optimal" if provides_option_damage else "lwq"


def make_plan(
    scores: LayerScores,
    bits: float | None = 3.25,
    *,
    planner: str | None = None,
    high: int = 4,
    low: int = 2,
    group_size: int = 128,
    sym: bool = False,
    method: str | None = None,
    order: str = "importance",
    seed: int = 0,
    n_low: int | None = None,
    options: str | list[str] | None = None,
) -> Plan:
    """Turn scores and a budget (average bits per decoder weight, overhead included) into a plan.

    `lwq` reads `high`, `low`, `group_size`, `sym`, `order`, `seed`, `n_low`; `optimal` reads `options`
    (e.g. ``"2:128,3:128,4:128,8:128"``; default: every option the scores measured). `planner` defaults
    to `optimal` when the scores carry measured damage per option, else `lwq`.
    """
    check_numbers(bits=bits, high=high, low=low, group_size=group_size, seed=seed, n_low=n_low)
    planner = planner or default_planner(bool(scores.option_damage))
    plan_fn = PLANNERS.get(planner)
    if method is not None:
        QUANTIZERS.get(method)
    parsed = None if options is None else tuple(parse_options(options, default_method=method or "rtn"))
    values = dict(bits=bits, high=high, low=low, group_size=group_size, sym=sym, method=method, order=order,
                  seed=seed, n_low=n_low, options=parsed)
    config_class = plan_fn.config_class  # type: ignore[attr-defined]
    accepted = {f.name for f in fields(config_class)}
    if bits is None and "n_low" not in accepted:
        raise LayerwiseError(f"planner {planner!r} needs a budget: give --bits")
    return plan_fn(scores, config_class(**{k: v for k, v in values.items() if k in accepted}))


def apply(
    model_or_path: nn.Module | str | None,
    plan: Plan,
    method: str = "rtn",
    *,
    tokenizer: Any = None,
    scores: LayerScores | None = None,
    calib: str | torch.Tensor = "wikipedia",
    calib_windows: int = DEFAULT_CALIB_WINDOWS,
    calib_len: int = DEFAULT_CALIB_LEN,
    tie_mode: str = "first",
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> CompressResult:
    """Compress the model in place as `plan` says; `method` fills the quantize actions that name none.

    Pruned layers are removed, dropped sub-layers replaced, tied layers share their representative's
    modules (`tie_mode` ``average`` first gives the representative its run's mean weights), then the
    layers are quantized. Calibration text (`calib`, as in `score`) is read only when a method needs it
    (gptq).
    """
    check_numbers(calib_windows=calib_windows, calib_len=calib_len)
    check_cpu_float32(device, dtype)
    QUANTIZERS.get(method)
    if tie_mode not in TIE_MODES:
        raise LayerwiseError(f"unknown tie mode {tie_mode!r}; choose one of {', '.join(TIE_MODES)}")
    model, tokenizer, name = _resolve(model_or_path, tokenizer)
    check_plan_fits(plan, model)
    windows = None
    if plan_needs_calibration(plan, method):
        windows, _ = _calibration(tokenizer, calib, calib_windows, calib_len, f"method {method!r}")
    shapes = layer_linear_shapes(model)
    start = time.perf_counter()
    compacted = apply_structure(model, plan, tie_mode) if plan.structural else plan
    return _quantize(model, tokenizer, name, plan, compacted, method, shapes, windows, scores, start, progress)


def _quantize(
    model: nn.Module,
    tokenizer: Any,
    name: str,
    plan: Plan,
    compacted: Plan,
    method: str,
    shapes: list[LinearShapes],
    windows: torch.Tensor | None,
    scores: LayerScores | None,
    start: float,
    progress: bool,
) -> CompressResult:
    """Quantize the (already restructured) model by `compacted` and report against the original `plan`."""
    element_bytes = next(model.parameters()).element_size()
    outcomes = apply_plan(model, compacted, method, windows=windows, progress=progress)
    kept = plan.kept_layers()
    for outcome in outcomes:  # report in the original model's numbering
        outcome.layer = kept[outcome.layer]
    applied = resolve_methods(plan, method)
    report = build_report(model, applied, outcomes, shapes, model_name=name, original_element_bytes=element_bytes,
                          scores=scores)
    report.metrics["quantize_seconds"] = round(time.perf_counter() - start, 2)
    return CompressResult(model, tokenizer, applied, scores, report)


def compress(
    model_or_path: nn.Module | str | None = None,
    bits: float | None = 3.25,
    *,
    scorer: str = "sensitivity",
    planner: str | None = None,
    method: str = "gptq",
    group_size: int = 128,
    high: int = 4,
    low: int = 2,
    sym: bool = False,
    order: str = "importance",
    seed: int = 0,
    n_low: int | None = None,
    options: str | list[str] | None = None,
    uniform: int | None = None,
    prune: int = 0,
    prune_block: bool = False,
    prune_scorer: str | None = None,
    drop_attn: int = 0,
    drop_mlp: int = 0,
    tie: int = 0,
    tie_mode: str = "first",
    tokenizer: Any = None,
    calib: str | torch.Tensor = "wikipedia",
    calib_windows: int = DEFAULT_CALIB_WINDOWS,
    calib_len: int = DEFAULT_CALIB_LEN,
    progress: bool = True,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    stream: bool | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> CompressResult:
    """Score, plan and compress in one call; the model is modified in place and returned.

    `model_or_path`: an ``AutoModelForCausalLM`` (pass its `tokenizer` for scorers that read text), a
    local HF directory, a hub id, or None / ``"smollm2-135m"`` for the built-in default model.
    `bits`: average bits per decoder weight including scale/zero overhead (non-integer is the point).
    The default (`scorer="sensitivity"`, planner `optimal`, `method="gptq"`) measures the damage of
    every option in `options` (default ``DEFAULT_OPTIONS``, each with `method` unless it names one) on
    each layer and picks the least damaging mix that fits `bits`: the lowest perplexity measured
    (docs/RESULTS.md). `planner` defaults to `optimal` for scorers that measure damage per option, else
    to the seed paper's `lwq`. `uniform=b` skips scoring and planning: every layer at b bits, `group_size`.

    Structure (layerwise.structure): `prune` layers (chosen by `prune_scorer`, default
    `DEFAULT_PRUNE_SCORER`; `prune_block` removes one contiguous block by angular distance), drop
    `drop_attn` attention and `drop_mlp` MLP sub-layers (`sublayer` scorer), `tie` layers to their
    neighbours (`tie` scorer; `tie_mode` first or average). These happen first; the layers left are then
    quantized to meet `bits` over the original model's weights (pruned weights free budget), or not at
    all when `bits` and `uniform` are None.

    `out`: also write the checkpoint there (as `save`; `overwrite` replaces an existing one). With `out`
    and a model given by path, `stream` picks streaming compression (layerwise.streaming: one decoder
    layer in memory at a time, each written out as it finishes; the returned result's `model` is then
    None, load the checkpoint with `layerwise.load`): True forces it, False forbids it, None (default)
    streams when the float32 weights exceed `STREAM_FRACTION` (40%) of the memory available. `resume`
    continues an interrupted streamed run into `out` from its last finished layer (it implies streaming);
    the arguments must be the ones the run started with.
    """
    check_numbers(bits=bits, group_size=group_size, high=high, low=low, seed=seed, n_low=n_low, uniform=uniform,
                  prune=prune, drop_attn=drop_attn, drop_mlp=drop_mlp, tie=tie, calib_windows=calib_windows,
                  calib_len=calib_len)
    check_cpu_float32(device, dtype)
    if out is not None:
        check_not_inside(out, [model_or_path])
    structure = StructureConfig(prune, prune_block, drop_attn, drop_mlp, tie, tie_mode)
    # Validate every name, then the budget against the model's shapes, before the slow steps run.
    scorer_cls = SCORERS.get(scorer)
    planner = planner or default_planner(scorer_cls.provides_option_damage)
    plan_fn = PLANNERS.get(planner)
    QUANTIZERS.get(method)
    quantizing = uniform is not None or bits is not None or n_low is not None
    if not quantizing and structure.empty:
        raise LayerwiseError("nothing to do: give a budget (bits), uniform bits, or a structural change (prune, "
                             "drop_attn, drop_mlp, tie)")
    plan_needs_options = "options" in {f.name for f in fields(plan_fn.config_class)}  # type: ignore[attr-defined]
    if quantizing and uniform is None and plan_needs_options and not scorer_cls.provides_option_damage:
        measuring = [n for n in SCORERS.names() if SCORERS.get(n).provides_option_damage]
        raise LayerwiseError(
            f"planner {planner!r} needs measured damage per option; scorer {scorer!r} gives none "
            f"(use --scorer {' or '.join(measuring)})"
        )
    structural_scorers = structure.scorers(prune_scorer)
    for name in set(structural_scorers.values()):
        SCORERS.get(name)
    if plan_needs_options and options is None:
        options = DEFAULT_OPTIONS
    plan_options: dict[str, Any] = dict(planner=planner, high=high, low=low, group_size=group_size, sym=sym,
                                        method=method, order=order, seed=seed, n_low=n_low, options=options)
    if _streams(model_or_path, out, stream, resume, scorer, structure, quantizing, uniform, structural_scorers):
        return _compress_streaming(model_or_path, out, overwrite, resume, progress, calib, calib_windows, calib_len,
                                   RunArgs(bits=bits, scorer=scorer, planner=planner, method=method,
                                           group_size=group_size, high=high, low=low, sym=sym, order=order,
                                           seed=seed, n_low=n_low, options=options, uniform=uniform,
                                           calib=calib if isinstance(calib, str) else "<token windows>",
                                           calib_windows=calib_windows, calib_len=calib_len,
                                           plan_options=plan_options))
    if out is not None:
        from layerwise.checkpoint import check_output_dir

        check_output_dir(out, overwrite)
        _check_no_partial(out)
    model, tokenizer, name = _resolve(model_or_path, tokenizer)
    shapes = layer_linear_shapes(model)
    structure.check(len(shapes))
    start = time.perf_counter()
    if uniform is None and quantizing and structure.empty:
        zeros = [0.0] * len(shapes)
        dry_damage = {o.option(): zeros for o in parse_options(options, method)} if options else {}
        make_plan(LayerScores("budget-check", zeros, shapes, option_damage=dry_damage), bits, **plan_options)
    calib_summary: dict[str, Any] = {}
    if structural_scorers or (quantizing and uniform is None and scorer_cls.needs_activations) or (
        quantizing and method_needs_hessian(method)
    ):
        # Tokenize once; every scorer and the quantizer read the same windows.
        calib, calib_summary = _calibration(tokenizer, calib, calib_windows, calib_len, f"{scorer!r} with {method!r}")
    structure_plan = Plan([LayerAction(i, "keep") for i in range(len(shapes))])
    if structural_scorers:
        structure_plan = _plan_structure(model, structure, structural_scorers, calib, name, calib_summary, progress)
    compacted = apply_structure(model, structure_plan, tie_mode) if structure_plan.structural else structure_plan
    scores, target_bits = None, bits if quantizing and uniform is None else None
    if not quantizing:
        quantized = compacted
    elif uniform is not None:
        quantized = _fill(compacted, uniform_plan(_free_shapes(model, compacted), uniform, group_size, sym=sym,
                                                  method=method))
    else:
        scores = score(model, scorer, tokenizer=tokenizer, calib=calib, calib_windows=calib_windows,
                       calib_len=calib_len, options=options, method=method, progress=progress)
        scores.model = name
        if scores.calibration:
            scores.calibration = calib_summary
        free_shapes = _free_shapes(model, compacted)
        if bits is not None and structure_plan.structural:
            bits = _free_budget(bits, shapes, free_shapes, plan_fn, high, group_size, sym)
        sub_plan = make_plan(scores.subset(_free_layers(compacted), free_shapes), bits, **plan_options)
        quantized = _fill(compacted, sub_plan)
    plan = structure_plan.expand(quantized)
    plan.target_bits = target_bits
    plan.avg_bits = average_bits(plan.layers, shapes)
    plan.made_by = {**(quantized.made_by if quantizing else {}), **structure_plan.made_by}
    windows = calib if isinstance(calib, torch.Tensor) and plan_needs_calibration(plan, method) else None
    result = _quantize(model, tokenizer, name, plan, quantized, method, shapes, windows, scores, start, progress)
    if scores is not None:
        result.report.metrics["score_seconds"] = round(scores.seconds, 2)
    result.report.metrics["compress_seconds"] = round(time.perf_counter() - start, 2)
    if out is not None:
        save(result, str(out), overwrite=overwrite)
    return result


def _streams(model_or_path: nn.Module | str | None, out: str | os.PathLike | None, stream: bool | None,
             resume: bool, scorer: str, structure: StructureConfig, quantizing: bool, uniform: int | None,
             structural_scorers: dict[str, str]) -> bool:
    """Whether `compress` streams (see its docstring), refusing combinations streaming cannot do."""
    asked = "resume" if resume else "stream=True"
    if isinstance(model_or_path, nn.Module):
        if stream or resume:
            raise LayerwiseError(f"{asked} reads the model from its files: pass its directory, not a loaded model")
        return False
    if stream is False:
        if resume:
            raise LayerwiseError("resume continues a streamed compression: drop stream=False (--no-stream)")
        return False
    if stream is None and not resume:
        if out is None:
            return False
        from layerwise.loading import resolve_model_path
        from layerwise.streaming import should_stream

        wanted, why = should_stream(resolve_model_path(model_or_path))
        if not wanted:
            return False
        asked = f"the model is large ({why}) so it is streamed, and streaming"
    else:
        asked = f"{asked} streams the model, and streaming"
    if out is None:
        raise LayerwiseError(f"{asked} writes each layer as it finishes: give out= (--out)")
    if not structure.empty:
        raise LayerwiseError(f"{asked} cannot prune, drop or tie layers yet; compress without streaming "
                             "(stream=False, --no-stream) or without the structural options")
    if quantizing and uniform is None and not SCORERS.get(scorer).layer_local:
        local = [n for n in SCORERS.names() if SCORERS.get(n).layer_local]
        raise LayerwiseError(f"{asked} cannot use scorer {scorer!r}, which needs the whole model in memory; use "
                             f"{', '.join(local)} (--scorer), uniform bits (--uniform), or stream=False (--no-stream)")
    return True


def _check_no_partial(out: str | os.PathLike) -> None:
    from layerwise.streaming import partial_dir, partial_exists

    if partial_dir(out).exists():
        raise partial_exists(out)


def _compress_streaming(model_or_path: str | None, out: str | os.PathLike | None, overwrite: bool, resume: bool,
                        progress: bool, calib: str | torch.Tensor, calib_windows: int, calib_len: int,
                        args: RunArgs) -> CompressResult:
    from layerwise.loading import resolve_model_path
    from layerwise.streaming import compress_streaming

    assert out is not None
    return compress_streaming(resolve_model_path(model_or_path), out, args, name=model_name(model_or_path),
                              resume=resume, overwrite=overwrite, progress=progress,
                              calib_windows=calib if isinstance(calib, torch.Tensor) else None)


def _plan_structure(
    model: nn.Module,
    structure: StructureConfig,
    scorers: dict[str, str],
    windows: torch.Tensor,
    name: str,
    calib_summary: dict[str, Any],
    progress: bool,
) -> Plan:
    """Score what the structural choices need, in one pass, and plan them."""
    results = score_model(model, sorted(set(scorers.values())), windows, model_name=name,
                          calibration=calib_summary, progress=progress)
    actions = plan_structure(len(decoder_layers(model)), structure,
                             **{f"{role}_scores": results[scorer] for role, scorer in scorers.items()})
    return Plan(actions, made_by={"structure": asdict(structure), "structure_scorers": scorers})


def _free_budget(bits: float, shapes: list[LinearShapes], free_shapes: list[LinearShapes], plan_fn: Any,
                 high: int, group_size: int, sym: bool) -> float:
    """`bits` over the original weights as average bits over the weights left to quantize.

    What pruning, tying and dropping removed is free to spend. A two-width planner cannot spend more
    than every layer at its high width costs, so the budget is capped there.
    """
    free_bits = bits * sum(map(n_weights, shapes)) / sum(map(n_weights, free_shapes))
    if "high" in {f.name for f in fields(plan_fn.config_class)}:
        free_bits = min(free_bits, uniform_plan(free_shapes, high, group_size, sym=sym).avg_bits)
    return free_bits


def _free_layers(compacted: Plan) -> list[int]:
    """Layers with weights of their own to quantize: all but the tied ones."""
    return [a.layer for a in compacted.layers if a.action != "tie"]


def _free_shapes(model: nn.Module, compacted: Plan) -> list[LinearShapes]:
    shapes = layer_linear_shapes(model)  # after restructuring: dropped sub-layers have no linears
    return [shapes[i] for i in _free_layers(compacted)]


def _fill(compacted: Plan, sub_plan: Plan) -> Plan:
    """`compacted` with its free layers' actions from `sub_plan` (numbered over the free layers only)."""
    free = _free_layers(compacted)
    layers = list(compacted.layers)
    for k, action in zip(free, sub_plan.layers, strict=True):
        layers[k] = replace(action, layer=k, drop=list(layers[k].drop))
    return replace(compacted, layers=layers, made_by=sub_plan.made_by)


def save(result: CompressResult, out: str, *, overwrite: bool = False) -> str:
    """Write a `compress()`/`apply()` result as a layerwise checkpoint directory."""
    from layerwise.checkpoint import save_checkpoint

    check_not_inside(out, [result.report.model, *([result.model] if result.model is not None else [])])
    extra: dict[str, Any] = {"report": result.report.to_dict()}
    if result.scores is not None:
        extra["scores"] = result.scores.to_dict()
    save_checkpoint(result.model, result.tokenizer, out, plan=result.plan, extra=extra, overwrite=overwrite)
    return out
