"""The Python API: score, plan, apply, or all three in one `compress()` call.

`compress()` in full.

`model_or_path`: an ``AutoModelForCausalLM`` (pass its `tokenizer` for scorers that read text), a
local HF directory, a hub id, or None / ``"smollm2-135m"`` for the built-in default model.
`bits`: average bits per decoder weight including scale/zero overhead (non-integer is the point).
The default (`scorer="sensitivity"`, planner `optimal`, `method="gptaq"`, `rotate="auto"`) measures the damage of
every option in `options` (default ``DEFAULT_OPTIONS``, each with `method` unless it names one) on
each layer and picks the least damaging mix that fits `bits`: the lowest perplexity measured
(docs/RESULTS.md). `planner` defaults to `optimal` for scorers that measure damage per option, else
to the seed paper's `lwq`. `uniform=b` skips scoring and planning: every layer at b bits, `group_size`
(default 128). The planner arguments (`group_size`, `high`, `low`, `sym`, `order`, `seed`, `n_low`,
`options`, `granularity`) left at None are not given: the planner uses its own defaults, and refuses one it
does not take. `granularity` says what gets one option each: ``"layer"`` (default: one option per decoder
layer), ``"module"`` (each linear module, its damage measured alone: one layer run per module and option
instead of per option) or ``"fused"`` (modules, with vLLM's fused q/k/v and gate/up sets as one unit; a
``target="vllm"`` run turns ``"module"`` into this). ``target="gguf"`` defaults to ``"module"``: a llama.cpp
type per tensor (docs/RESULTS.md: per layer, the measured allocation lost to llama.cpp's own rules).

Structure (layerwise.planning.structure): `prune` layers (chosen by `prune_scorer`, default
`DEFAULT_PRUNE_SCORER`; `prune_block` removes one contiguous block by angular distance), drop
`drop_attn` attention and `drop_mlp` MLP sub-layers (`sublayer` scorer), `tie` layers to their
neighbours (`tie` scorer; `tie_mode` first or average). These happen first; the layers left are then
quantized to meet `bits` over the original model's weights (pruned weights free budget), or not at
all when `bits` and `uniform` are None.

`out`: also write the checkpoint there (as `save`; `overwrite` replaces an existing one). With `out`
and a model given by path, `stream` picks streaming compression (layerwise.engine.streaming: one decoder
layer in memory at a time, each written out as it finishes; the returned result's `model` is then
None, load the checkpoint with `layerwise.load`): True forces it, False forbids it, None (default)
streams when the float32 weights exceed `STREAM_FRACTION` (40%) of the memory available. `resume`
continues an interrupted streamed compression into `out` from its last finished layer (it implies
streaming); the recipe must be the one the run started with.

`rotate`: fuse orthogonal rotations into the weights before scoring and quantizing (`layerwise.transform`):
``"hadamard"`` is R1 (the residual stream, with the RMSNorm scales folded into the linears and a tied head
untied) and R2 (each head's values), ``"hadamard:r2"`` R2 alone (all gemma3 allows); `rotate_seed` seeds
the random signs. The model computes the same function before quantization. ``"auto"`` (the default)
fuses ``hadamard`` when the architecture allows R1 (llama, mistral, qwen2, phi3), the head is not tied
to the embedding (untying it would add vocab × hidden parameters: +113 MB on the default model), every
method reads a Hessian (gptq, gptaq: with RTN rotation was measured to hurt) and the model is in memory;
otherwise none, and a streamed run says so (streaming cannot rotate yet; an explicit rotation is refused
there). None: no rotation.

`device`: ``auto`` (default: CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``. The weights stay on
the CPU (or on disk when streaming); each decoder layer moves to the device for its calibration
forward, scoring and quantization, then back. `dtype`: ``float32``, ``bfloat16`` or ``float16`` (default:
the checkpoint's own on a GPU, float32 on the CPU); Hessians and GPTQ arithmetic are float32 always.

`grid`: how each group's scale and zero are chosen (`layerwise.core.types.GRIDS`): ``minmax`` (default)
from the group's range, ``mse`` by a search for the least squared error, each weight's error weighted by
its input's Hessian diagonal under GPTQ (`layerwise.quant.grid`). The stored format is the same.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from layerwise.core import dist
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import DEFAULT_GRID, LayerScores, Plan
from layerwise.core.validate import check_numbers
from layerwise.data.corpora import DEFAULT_CALIB_LEN, DEFAULT_CALIB_WINDOWS
from layerwise.engine.pipeline import CompressResult, calibration, open_placed, run
from layerwise.engine.recipe import DEFAULT_METHOD, DEFAULT_SCORER, TOKEN_WINDOWS, Calibration, Recipe
from layerwise.engine.sinks import MemorySink, WorkDirSink
from layerwise.engine.sources import ResidentSource, StreamedSource
from layerwise.importance import SCORERS, score_model
from layerwise.model.device import resolve_device
from layerwise.model.loading import model_name, resolve_model_path
from layerwise.output.checkpoint import save_checkpoint
from layerwise.output.paths import check_not_inside
from layerwise.planning.planners import make_plan
from layerwise.planning.structure import TIE_MODES, StructureConfig
from layerwise.transform import AUTO

DEFAULT_MODEL = "smollm2-135m"
__all__ = ["DEFAULT_MODEL", "CompressResult", "apply", "compress", "make_plan", "save", "score"]


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
    granularity: str | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LayerScores:
    """Score every decoder layer with `scorer` (see `layerwise.importance.SCORERS`).

    `calib` is a built-in corpus name, a text file, or token windows (a LongTensor [n, length]).
    `options`, `method` and `granularity` (``layer``, ``module`` or ``fused``: what one damage measurement
    covers) go to scorers that measure quantization options (`sensitivity`).
    `device` and `dtype`: where the layers run, as for `compress`.
    """
    check_numbers(calib_windows=calib_windows, calib_len=calib_len)
    scorer_cls = SCORERS.get(scorer)
    source = ResidentSource(model_or_path, tokenizer)
    resolved = dist.local_device(resolve_device(_name(device) or "auto"))
    dist.init_from_environment(resolved)
    placement = open_placed(source, resolved, _name(dtype))
    windows, summary = None, None
    if scorer_cls.needs_activations:
        windows, summary = calibration(source.tokenizer, calib, calib_windows, calib_len, f"scorer {scorer!r}")
    offered = {"options": options, "method": method, "granularity": granularity}
    kwargs = {k: v for k, v in offered.items() if k in scorer_cls.parameters() and v is not None}
    return score_model(source.model, [scorer], windows, model_name=source.name, calibration=summary,
                       scorer_options={scorer: kwargs}, progress=progress, placement=placement)[scorer]


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
    grid: str = DEFAULT_GRID,
    rotate: str | None = None,
    rotate_seed: int = 0,
) -> CompressResult:
    """Compress the model in place as `plan` says; `method` and `grid` fill the quantize actions that name none.

    Pruned layers are removed, dropped sub-layers replaced, tied layers share their representative's
    modules (`tie_mode` ``average`` first gives the representative its run's mean weights), then the
    layers are quantized. Calibration text (`calib`, as in `score`) is read only when a method needs it
    (gptq). The same pipeline as `compress`, with the plan given instead of made; `device`, `dtype`, `rotate`
    and `rotate_seed` as there.
    """
    check_numbers(calib_windows=calib_windows, calib_len=calib_len, rotate_seed=rotate_seed)
    if tie_mode not in TIE_MODES:
        raise LayerwiseError(f"unknown tie mode {tie_mode!r}; choose one of {', '.join(TIE_MODES)}")
    recipe = Recipe(method=method, plan=plan, structure=StructureConfig(tie_mode=tie_mode),
                    calibration=Calibration(calib if isinstance(calib, str) else TOKEN_WINDOWS, calib_windows,
                                            calib_len), device=_name(device) or "auto", dtype=_name(dtype), grid=grid,
                    rotate=rotate, rotate_seed=rotate_seed)
    windows = calib if isinstance(calib, torch.Tensor) else None
    return run(recipe, ResidentSource(model_or_path, tokenizer), MemorySink(None), calib=windows, scores=scores,
               progress=progress)


def compress(
    model_or_path: nn.Module | str | None = None,
    bits: float | None = 3.25,
    *,
    scorer: str = DEFAULT_SCORER,
    planner: str | None = None,
    method: str = DEFAULT_METHOD,
    group_size: int | None = None,
    high: int | None = None,
    low: int | None = None,
    sym: bool | None = None,
    order: str | None = None,
    seed: int | None = None,
    n_low: int | None = None,
    options: str | list[str] | None = None,
    granularity: str | None = None,
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
    grid: str = DEFAULT_GRID,
    rotate: str | None = AUTO,
    rotate_seed: int = 0,
    target: str | None = None,
) -> CompressResult:
    """Score, plan and compress in one call; the model is modified in place and returned.

    `model_or_path`: a model object (with its `tokenizer`), a local HF directory, a hub id, or None for the
    built-in default model. `bits`: average bits per decoder weight, scale/zero overhead included; the
    default path measures each option's damage per layer (`sensitivity`), allocates (`optimal`) and
    quantizes (`gptaq`). `uniform=b`: every layer at b bits. Planner arguments left at None are not given
    (the planner's defaults apply; one it does not take is refused). `prune`/`drop_attn`/`drop_mlp`/`tie`
    remove structure first. `out` writes the checkpoint; `stream`/`resume` read the model one layer at a
    time into a resumable work directory. `device`/`dtype` place each layer's work. `grid` chooses each
    group's scale and zero (``minmax`` or ``mse``, see `layerwise.quant.grid`). `rotate` fuses rotations into
    the weights before scoring (``"auto"``, the default: R1 + R2 where they apply and cost no storage; None:
    off). `target` ``"gguf"`` plans with llama.cpp's types (default options ``q2_k`` ... ``q8_0``) for
    ``--format gguf``; ``"vllm"`` refuses them. The module docstring (`help(layerwise.api)`) says each argument in full.
    """
    check_numbers(bits=bits, group_size=group_size, high=high, low=low, seed=seed, n_low=n_low, uniform=uniform,
                  prune=prune, drop_attn=drop_attn, drop_mlp=drop_mlp, tie=tie, calib_windows=calib_windows,
                  calib_len=calib_len, rotate_seed=rotate_seed)
    if out is not None:
        check_not_inside(out, [model_or_path])
    recipe = Recipe.build(
        bits=bits, uniform=uniform, scorer=scorer, planner=planner, method=method, group_size=group_size,
        high=high, low=low, sym=sym, order=order, seed=seed, n_low=n_low, options=options, granularity=granularity,
        structure=StructureConfig(prune, prune_block, drop_attn, drop_mlp, tie, tie_mode), prune_scorer=prune_scorer,
        calibration=Calibration(calib if isinstance(calib, str) else TOKEN_WINDOWS, calib_windows, calib_len),
        device=_name(device) or "auto", dtype=_name(dtype), grid=grid, rotate=rotate, rotate_seed=rotate_seed,
        target=target,
    )
    windows = calib if isinstance(calib, torch.Tensor) else None
    source, sink = _source_and_sink(model_or_path, tokenizer, out, overwrite, stream, resume)
    return run(recipe, source, sink, calib=windows, progress=progress)


def _source_and_sink(model_or_path: nn.Module | str | None, tokenizer: Any, out: str | os.PathLike | None,
                     overwrite: bool, stream: bool | None, resume: bool):
    """A resident model and memory, or the model's files read layer by layer into a work directory."""
    why = _streams(model_or_path, out, stream, resume)
    if why is None:
        return ResidentSource(model_or_path, tokenizer), MemorySink(out, overwrite)
    assert out is not None and not isinstance(model_or_path, nn.Module)
    return (StreamedSource(resolve_model_path(model_or_path), model_name(model_or_path), why),
            WorkDirSink(out, overwrite, resume))


def _streams(model_or_path: nn.Module | str | None, out: str | os.PathLike | None, stream: bool | None,
             resume: bool) -> str | None:
    """Why `compress` streams, in words for the messages of what streaming cannot do (None: it does not)."""
    asked = "resume" if resume else "stream=True"
    if isinstance(model_or_path, nn.Module):
        if stream or resume:
            raise LayerwiseError(f"{asked} reads the model from its files: pass its directory, not a loaded model")
        return None
    if stream is False:
        if resume:
            raise LayerwiseError("resume continues a streamed compression: drop stream=False (--no-stream)")
        return None
    if stream is None and not resume:
        if out is None:
            return None
        from layerwise.engine.streaming import should_stream

        wanted, why = should_stream(resolve_model_path(model_or_path))
        if not wanted:
            return None
        asked = f"the model is large ({why}) so it is streamed, and streaming"
    else:
        asked = f"{asked} streams the model, and streaming"
    if out is None:
        raise LayerwiseError(f"{asked} writes each layer as it finishes: give out= (--out)")
    return asked


def _name(value: str | torch.device | torch.dtype | None) -> str | None:
    """A device or dtype as the recipe records it: ``cuda:0``, ``bfloat16``."""
    return None if value is None else str(value).removeprefix("torch.")


def save(result: CompressResult, out: str, *, overwrite: bool = False) -> str:
    """Write a `compress()`/`apply()` result as a layerwise checkpoint directory (in a process group: rank 0
    writes, the others wait for it)."""
    check_not_inside(out, [result.report.model, *([result.model] if result.model is not None else [])])
    extra: dict[str, Any] = {} if result.recipe is None else {"recipe": result.recipe.to_dict()}
    extra["report"] = result.report.to_dict()
    if result.scores is not None:
        extra["scores"] = result.scores.to_dict()
    if result.rotation is not None:
        extra["rotation"] = result.rotation.to_dict()
    if dist.is_main():
        save_checkpoint(result.model, result.tokenizer, out, plan=result.plan, extra=extra, overwrite=overwrite)
    dist.barrier()
    return out
