"""The Python API: score, plan, apply, or all three in one `compress()` call."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerwise.applier import apply_plan, check_plan_fits, resolve_methods
from layerwise.data import DEFAULT_CALIB_LEN, DEFAULT_CALIB_WINDOWS, calibration_windows
from layerwise.errors import LayerwiseError
from layerwise.importance import SCORERS, score_model
from layerwise.loading import load_model, model_name
from layerwise.models import check_causal_lm, layer_linear_shapes
from layerwise.planners import PLANNERS, LwqConfig
from layerwise.quant import QUANTIZERS
from layerwise.report import Report, build_report
from layerwise.types import LayerScores, Plan

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
    check_causal_lm(model)
    return model, tokenizer or loaded_tokenizer, model_name(model_or_path)


def score(
    model_or_path: nn.Module | str | None = None,
    scorer: str = "lim",
    *,
    tokenizer: Any = None,
    calib: str | torch.Tensor = "wikipedia",
    calib_windows: int = DEFAULT_CALIB_WINDOWS,
    calib_len: int = DEFAULT_CALIB_LEN,
    progress: bool = True,
) -> LayerScores:
    """Score every decoder layer with `scorer` (see `layerwise.importance.SCORERS`).

    `calib` is a built-in corpus name, a text file, or token windows (a LongTensor [n, length]).
    """
    scorer_cls = SCORERS.get(scorer)
    model, tokenizer, name = _resolve(model_or_path, tokenizer)
    windows, calibration = None, None
    if scorer_cls.needs_activations:
        if isinstance(calib, torch.Tensor):
            windows, corpus = calib, "token windows given by the caller"
        elif tokenizer is None:
            raise LayerwiseError(f"scorer {scorer!r} reads calibration text: pass tokenizer= with the model")
        else:
            windows, corpus = calibration_windows(tokenizer, calib, calib_windows, calib_len), calib
        calibration = {"corpus": corpus, "windows": int(windows.shape[0]), "window_len": int(windows.shape[1]),
                       "tokens": int(windows.numel())}
    return score_model(model, [scorer], windows, model_name=name, calibration=calibration, progress=progress)[scorer]


def make_plan(
    scores: LayerScores,
    bits: float | None = 3.25,
    *,
    planner: str = "lwq",
    high: int = 4,
    low: int = 2,
    group_size: int = 128,
    sym: bool = False,
    method: str | None = None,
    order: str = "importance",
    seed: int = 0,
    n_low: int | None = None,
) -> Plan:
    """Turn scores and a budget (average bits per decoder weight, overhead included) into a plan."""
    plan_fn = PLANNERS.get(planner)
    if method is not None:
        QUANTIZERS.get(method)
    config = LwqConfig(bits=bits, high=high, low=low, group_size=group_size, sym=sym, method=method, order=order,
                       seed=seed, n_low=n_low)
    return plan_fn(scores, config)


def apply(
    model_or_path: nn.Module | str | None,
    plan: Plan,
    method: str = "rtn",
    *,
    tokenizer: Any = None,
    scores: LayerScores | None = None,
    progress: bool = True,
) -> CompressResult:
    """Quantize the model in place as `plan` says; `method` fills the actions that name none."""
    QUANTIZERS.get(method)
    model, tokenizer, name = _resolve(model_or_path, tokenizer)
    check_plan_fits(plan, model)
    shapes = layer_linear_shapes(model)
    element_bytes = next(model.parameters()).element_size()
    start = time.perf_counter()
    outcomes = apply_plan(model, plan, method, progress=progress)
    applied = resolve_methods(plan, method)
    report = build_report(model, applied, outcomes, shapes, model_name=name, original_element_bytes=element_bytes,
                          scores=scores)
    report.metrics["quantize_seconds"] = round(time.perf_counter() - start, 2)
    return CompressResult(model, tokenizer, applied, scores, report)


def compress(
    model_or_path: nn.Module | str | None = None,
    bits: float | None = 3.25,
    *,
    scorer: str = "lim",
    planner: str = "lwq",
    method: str = "rtn",
    group_size: int = 128,
    high: int = 4,
    low: int = 2,
    sym: bool = False,
    order: str = "importance",
    seed: int = 0,
    n_low: int | None = None,
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
    """
    # Validate every name, then the budget against the model's shapes, before the slow steps run.
    SCORERS.get(scorer)
    PLANNERS.get(planner)
    QUANTIZERS.get(method)
    LwqConfig(bits=bits, high=high, low=low, group_size=group_size, sym=sym, order=order, seed=seed, n_low=n_low)
    model, tokenizer, name = _resolve(model_or_path, tokenizer)
    shapes = layer_linear_shapes(model)
    plan_options = dict(planner=planner, high=high, low=low, group_size=group_size, sym=sym, order=order, seed=seed,
                        n_low=n_low)
    make_plan(LayerScores("budget-check", [0.0] * len(shapes), shapes), bits, **plan_options)
    start = time.perf_counter()
    scores = score(model, scorer, tokenizer=tokenizer, calib=calib, calib_windows=calib_windows,
                   calib_len=calib_len, progress=progress)
    scores.model = name
    plan = make_plan(scores, bits, **plan_options)
    result = apply(model, plan, method, tokenizer=tokenizer, scores=scores, progress=progress)
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
