"""Quantize one linear-like module into a `QuantLinear`.

Hugging Face models use two linear layouts: `nn.Linear` (weight stored (out, in)) and GPT-2 style
`Conv1D` (weight stored (in, out)). Everything in `layerwise.quant` works on the (out, in) view that
`layerwise.model.adapter.linear_weight` gives.
"""

from __future__ import annotations

import torch
from torch import nn

from layerwise.core import dist
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.model.adapter import LINEAR_TYPES, linear_weight
from layerwise.quant.hessian import AsymmetricHessian
from layerwise.quant.qlinear import QuantLinear
from layerwise.quant.quantized import QuantizedWeight
from layerwise.quant.registry import QUANTIZERS, needs_hessian


def _check_linear(module: nn.Module) -> torch.Tensor:
    if not isinstance(module, LINEAR_TYPES):
        raise LayerwiseError(
            f"cannot quantize a {type(module).__name__}; only nn.Linear and transformers Conv1D are supported"
        )
    return linear_weight(module).detach()


def _wrap(module: nn.Module, weight: torch.Tensor, qw: QuantizedWeight, method: str) -> QuantLinear:
    if (qw.out_features, qw.in_features) != tuple(weight.shape):
        raise LayerwiseError(
            f"quantizer {method!r} returned a {qw.out_features}x{qw.in_features} weight for a "
            f"{weight.shape[0]}x{weight.shape[1]} module"
        )
    bias = getattr(module, "bias", None)
    return QuantLinear.from_quantized(qw, None if bias is None else bias.detach())


def quantize_module(module: nn.Module, spec: QuantSpec,
                    hessian: torch.Tensor | AsymmetricHessian | None = None) -> QuantLinear:
    """A `QuantLinear` computing the same function as `module`, up to quantization error.

    The method is looked up by ``spec.method`` in `QUANTIZERS`; `hessian` is passed through to it. The
    group size is the one that fits the module's input width (`QuantSpec.fit`), which is what the
    returned module's spec says. The bias, if any, is copied unquantized in its original dtype.
    """
    weight = _check_linear(module)
    spec = spec.fit(weight.shape[1])
    return _wrap(module, weight, QUANTIZERS.get(spec.method)().quantize(weight, spec, hessian), spec.method)


def quantize_modules(
    jobs: list[tuple[nn.Module, QuantSpec, torch.Tensor | AsymmetricHessian | None]],
    *,
    across_ranks: bool = False,
) -> list[QuantLinear]:
    """`quantize_module` for each (module, spec, hessian) job, sharing work between jobs where it can.

    Jobs whose method can quantize several weights in one pass (its quantizer's `shares_hessian`, GPTQ)
    and that use the same Hessian object run together: on a llama layer that is one
    sweep for q/k/v and one for gate/up, and in the sensitivity scorer one sweep for all candidate
    options of those modules. Specs are fitted to each module's width first (`QuantSpec.fit`), and jobs
    that then coincide (options 3:128 and 3:256 both become group 64 on a 576-wide module) are quantized
    once and share the result.

    `across_ranks`: every rank of a process group calls this with the same jobs (the same weights and
    Hessians), and the quantizations (a GPTQ sweep, or a job of a quantizer that reads no Hessian) are dealt
    among the ranks by their cost (`dist.deal`); each rank does its share, then every result is sent from its
    rank to the others (`dist.broadcast_from_owners`). A sweep is done whole by one rank, so each result is
    the one a single process computes. RTN is dealt too: repeated on each of 2 CPU ranks it made the default
    model's quantize phase 2.8 times one process's, dealt 1.4 times (docs/RESULTS.md). When the ranks share one
    machine's cores (`dist.pools_threads`), jobs that read no Hessian are instead done by rank 0 with every
    rank's threads, then the sweeps are dealt. Alone, or without `across_ranks`, every job runs here.
    """
    jobs = [(module, spec.fit(_check_linear(module).shape[1]), hessian) for module, spec, hessian in jobs]
    results: list[QuantLinear | None] = [None] * len(jobs)
    units: list[list[int]] = []  # quantized in one call each: a job alone, or the jobs of one sweep
    batches: dict[tuple[str, int, bool], list[int]] = {}
    first: dict[tuple[int, QuantSpec, int], int] = {}
    repeats: dict[int, int] = {}
    for index, (module, spec, hessian) in enumerate(jobs):
        key = (id(module), spec, id(hessian))
        if key in first:
            repeats[index] = first[key]
            continue
        first[key] = index
        if not _sweeps_together(spec, hessian):
            units.append([index])
        else:
            # GGUF types and integer grids sweep apart: their groups are fixed differently.
            key = (spec.method, id(hessian), spec.gguf is not None)
            if key not in batches:
                batches[key] = []
                units.append(batches[key])
            batches[key].append(index)
    if not across_ranks or dist.is_alone():
        for unit in units:
            _quantize_unit(jobs, unit, results)
    elif jobs and dist.pools_threads(_check_linear(jobs[0][0]).device):
        # Rank 0 first does what threads split well (RTN), with every rank's threads; then the sweeps are dealt.
        light = [u for u in units if not _reads_hessian(jobs, u)]
        sweeps = [u for u in units if _reads_hessian(jobs, u)]
        with dist.warnings_shared():
            _quantize_dealt(jobs, light, [0] * len(light), results, pooled=True)
            _quantize_dealt(jobs, sweeps, _owners(sweeps, jobs), results)
    else:
        with dist.warnings_shared():
            _quantize_dealt(jobs, units, _owners(units, jobs), results)
    for index, original in repeats.items():
        results[index] = results[original]
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _quantize_dealt(jobs: list[tuple[nn.Module, QuantSpec, torch.Tensor | AsymmetricHessian | None]],
                    units: list[list[int]], owners: list[int], results: list[QuantLinear | None],
                    pooled: bool = False) -> None:
    """Each unit quantized by its owner (with every local rank's threads when `pooled`), then sent from it to
    the other ranks."""
    def stored(u: int) -> list[torch.Tensor]:
        return [t for i in units[u] for t in stored_tensors(results[i])]  # type: ignore[arg-type]

    def quantized(u: int) -> list[torch.Tensor]:
        _quantize_unit(jobs, units[u], results)
        return stored(u)

    def awaited(u: int) -> list[torch.Tensor]:
        for i in units[u]:
            results[i] = empty_quantized(jobs[i][0], jobs[i][1])
        return stored(u)

    dist.from_owners(owners, quantized, awaited, pooled=pooled)


def _reads_hessian(jobs: list[tuple[nn.Module, QuantSpec, torch.Tensor | AsymmetricHessian | None]],
                   unit: list[int]) -> bool:
    """Whether the unit is quantized from a Hessian (GPTQ's column steps), which threads barely speed up."""
    _, spec, hessian = jobs[unit[0]]
    return needs_hessian(spec) and hessian is not None


def _quantize_unit(jobs: list[tuple[nn.Module, QuantSpec, torch.Tensor | AsymmetricHessian | None]],
                   unit: list[int], results: list[QuantLinear | None]) -> None:
    module, spec, hessian = jobs[unit[0]]
    if not _sweeps_together(spec, hessian):
        results[unit[0]] = quantize_module(module, spec, hessian)
        return
    weights = [_check_linear(jobs[i][0]) for i in unit]
    quantized = QUANTIZERS.get(spec.method)().quantize_shared(weights, [jobs[i][1] for i in unit], hessian)
    for i, weight, qw in zip(unit, weights, quantized, strict=True):
        results[i] = _wrap(jobs[i][0], weight, qw, spec.method)


def _sweeps_together(spec: QuantSpec, hessian: torch.Tensor | AsymmetricHessian | None) -> bool:
    """Whether the job joins the other jobs of its method and Hessian in one pass (its quantizer's `shares_hessian`)."""
    return QUANTIZERS.get(spec.method).shares_hessian and hessian is not None


def _owners(units: list[list[int]],
            jobs: list[tuple[nn.Module, QuantSpec, torch.Tensor | AsymmetricHessian | None]]) -> list[int]:
    """The rank that quantizes each unit, dealt by its cost (`dist.deal`)."""
    return dist.deal([_unit_cost(jobs, unit) for unit in units])


def _unit_cost(jobs: list[tuple[nn.Module, QuantSpec, torch.Tensor | AsymmetricHessian | None]],
               unit: list[int]) -> float:
    """A unit's work up to a constant factor: a GPTQ sweep's (`_sweep_cost`), or a weight's elements for a
    quantizer that reads no Hessian."""
    if _reads_hessian(jobs, unit):
        return _sweep_cost([jobs[i][0] for i in unit])
    return float(sum(linear_weight(jobs[i][0]).numel() for i in unit))


def _sweep_cost(modules: list[nn.Module]) -> float:
    """A GPTQ sweep's work up to a constant factor: factorising the inputs' Hessian, then each column's error
    pushed onto the columns after it, in every row of every weight."""
    in_features = linear_weight(modules[0]).shape[1]
    rows = sum(linear_weight(m).shape[0] for m in modules)
    return float(in_features ** 3 + rows * in_features ** 2)


def empty_quantized(module: nn.Module, spec: QuantSpec) -> QuantLinear:
    """The `QuantLinear` that quantizing `module` with `spec` gives, its stored tensors not yet filled (another
    rank computes them, `stored_tensors`) and its bias copied from `module`."""
    weight = linear_weight(module)
    bias = getattr(module, "bias", None)
    qlinear = QuantLinear(weight.shape[1], weight.shape[0], spec, bias=bias is not None,
                          dtype=bias.dtype if bias is not None else torch.float32, device=weight.device)
    if bias is not None:
        assert qlinear.bias is not None
        qlinear.bias.copy_(bias.detach())
    return qlinear


def stored_tensors(qlinear: QuantLinear) -> list[torch.Tensor]:
    """The tensors a quantizer computed (the bias is the module's own): what ranks send each other."""
    return [t for t in (qlinear.qweight, qlinear.scales, qlinear.zeros) if t is not None]


def relative_error(before: torch.Tensor | nn.Module, qlinear: QuantLinear) -> float:
    """``||W - deq(W)||_F / ||W||_F``: how much of the weight quantization lost (0 for a zero weight).

    `before` is the original module or its (out, in) weight.
    """
    weight = before if isinstance(before, torch.Tensor) else linear_weight(before).detach()
    weight = weight.detach().to(torch.float32)
    if tuple(weight.shape) != (qlinear.out_features, qlinear.in_features):
        raise LayerwiseError(
            f"weight of shape {tuple(weight.shape)} does not match the {qlinear.out_features}x"
            f"{qlinear.in_features} quantized module"
        )
    norm = torch.linalg.matrix_norm(weight)
    if norm == 0:
        return 0.0
    diff = qlinear.dequantize(torch.float32).to(weight.device)
    torch.sub(weight, diff, out=diff)  # weight - deq(W), written over deq(W): one weight-sized temporary
    return float(torch.linalg.matrix_norm(diff) / norm)


def squared_norm(weight: torch.Tensor) -> float:
    """``||W||_F^2`` summed in float64 (one float64 copy of the weight, squared in place)."""
    return float(weight.detach().to(torch.float64, copy=True).pow_(2).sum())
