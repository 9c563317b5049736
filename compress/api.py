"""The Python API: score, plan, apply, or all three in one `compress()` call."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from layerwise.applier import (
    apply_plan,
    check_plan_fits,
    method_needs_hessian,
    plan_needs_calibration,
    resolve_methods,
)
from layerwise.data import DEFAULT_CALIB_LEN, DEFAULT_CALIB_WINDOWS, calibration_windows
from layerwise.errors import LayerwiseError
from layerwise.importance import SCORERS, score_model
from layerwise.importance.sensitivity import DEFAULT_OPTIONS
from layerwise.loading import load_model, model_name
from layerwise.models import check_causal_lm, layer_linear_shapes
from layerwise.planners import PLANNERS, uniform_plan
from layerwise.quant import QUANTIZERS
from layerwise.report import Report, build_report
from layerwise.types import LayerScores, Plan, parse_options

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
        return model_or_path, tokenizer, name
    model, loaded_tokenizer = load_model(model_or_path)
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
) -> LayerScores:
    """Score every decoder layer with `scorer` (see `layerwise.importance.SCORERS`).

    `calib` is a built-in corpus name, a text file, or token windows (a LongTensor [n, length]).
    `options` and `method` go to scorers that measure quantization options (`sensitivity`).
    """
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
    progress: bool = True,
) -> CompressResult:
    """Quantize the model in place as `plan` says; `method` fills the actions that name none.

    Calibration text (`calib`, as in `score`) is read only when a method needs it (gptq).
    """
    QUANTIZERS.get(method)
    model, tokenizer, name = _resolve(model_or_path, tokenizer)
    check_plan_fits(plan, model)
    windows = None
    if plan_needs_calibration(plan, method):
        windows, _ = _calibration(tokenizer, calib, calib_windows, calib_len, f"method {method!r}")
    shapes = layer_linear_shapes(model)
    element_bytes = next(model.parameters()).element_size()
    start = time.perf_counter()
    outcomes = apply_plan(model, plan, method, windows=windows, progress=progress)
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
    tokenizer: Any = None,
    calib: str | torch.Tensor = "wikipedia",
    calib_windows: int = DEFAULT_CALIB_WINDOWS,
    calib_len: int = DEFAULT_CALIB_LEN,
    progress: bool = True,
) -> CompressResult:
    """Score, plan and quantize in one call; the model is modified in place and returned.

    `model_or_path`: an ``AutoModelForCausalLM`` (pass its `tokenizer` for scorers that read text), a
    local HF directory, a hub id, or None / ``"smollm2-135m"`` for the built-in default model.
    `bits`: average bits per decoder weight including scale/zero overhead (non-integer is the point).
    The default (`scorer="sensitivity"`, planner `optimal`, `method="gptq"`) measures the damage of
    every option in `options` (default ``DEFAULT_OPTIONS``, each with `method` unless it names one) on
    each layer and picks the least damaging mix that fits `bits`: the lowest perplexity measured
    (docs/RESULTS.md). `planner` defaults to `optimal` for scorers that measure damage per option, else
    to the seed paper's `lwq`. `uniform=b` skips scoring and planning: every layer at b bits, `group_size`.
    """
    # Validate every name, then the budget against the model's shapes, before the slow steps run.
    scorer_cls = SCORERS.get(scorer)
    planner = planner or default_planner(scorer_cls.provides_option_damage)
    plan_fn = PLANNERS.get(planner)
    QUANTIZERS.get(method)
    plan_needs_options = "options" in {f.name for f in fields(plan_fn.config_class)}  # type: ignore[attr-defined]
    if uniform is None and plan_needs_options and not scorer_cls.provides_option_damage:
        measuring = [n for n in SCORERS.names() if SCORERS.get(n).provides_option_damage]
        raise LayerwiseError(
            f"planner {planner!r} needs measured damage per option; scorer {scorer!r} gives none "
            f"(use --scorer {' or '.join(measuring)})"
        )
    if plan_needs_options and options is None:
        options = DEFAULT_OPTIONS
    model, tokenizer, name = _resolve(model_or_path, tokenizer)
    shapes = layer_linear_shapes(model)
    start = time.perf_counter()
    if uniform is not None:
        plan = uniform_plan(shapes, uniform, group_size, sym=sym, method=method)
        result = apply(model, plan, method, tokenizer=tokenizer, calib=calib, calib_windows=calib_windows,
                       calib_len=calib_len, progress=progress)
        result.report.metrics["compress_seconds"] = round(time.perf_counter() - start, 2)
        return result
    plan_options: dict[str, Any] = dict(planner=planner, high=high, low=low, group_size=group_size, sym=sym,
                                        method=method, order=order, seed=seed, n_low=n_low, options=options)
    zeros = [0.0] * len(shapes)
    dry_damage = {o.option(): zeros for o in parse_options(options, method)} if options else {}
    make_plan(LayerScores("budget-check", zeros, shapes, option_damage=dry_damage), bits, **plan_options)
    calib_summary: dict[str, Any] = {}
    if scorer_cls.needs_activations or method_needs_hessian(method):
        # Tokenize once; the scorer and the quantizer read the same windows.
        calib, calib_summary = _calibration(tokenizer, calib, calib_windows, calib_len, f"{scorer!r} with {method!r}")
    scores = score(model, scorer, tokenizer=tokenizer, calib=calib, calib_windows=calib_windows,
                   calib_len=calib_len, options=options, method=method, progress=progress)
    scores.model = name
    if scores.calibration:
        scores.calibration = calib_summary
    plan = make_plan(scores, bits, **plan_options)
    result = apply(model, plan, method, tokenizer=tokenizer, scores=scores, calib=calib, progress=progress)
    result.report.model = name
    result.report.metrics["score_seconds"] = round(scores.seconds, 2)
    result.report.metrics["compress_seconds"] = round(time.perf_counter() - start, 2)
    return result


def save(result: CompressResult, out: str, *, overwrite: bool = False) -> str:
    """Write a `compress()`/`apply()` result as a layerwise checkpoint directory."""
    from layerwise.checkpoint import save_checkpoint

    extra: dict[str, Any] = {"report": result.report.to_dict()}
    if result.scores is not None:
        extra["scores"] = result.scores.to_dict()
    save_checkpoint(result.model, result.tokenizer, out, plan=result.plan, extra=extra, overwrite=overwrite)
    return out
