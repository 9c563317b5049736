"""Measured sensitivity: what quantizing one layer alone, with each candidate option, does to its output.

For decoder layer i with full-precision input x (from the unmodified model) and output y = f_i(x), and
each option o (bits x group size x method), the layer's linears are quantized with o and the layer is run
again on the same inputs, giving y_o. The error delta = y_o - y lands in the residual stream. How much it
costs depends on the direction: LLM residual streams carry a few huge "massive activation" dimensions
that the loss barely reacts to, so a plain relative error ||delta||^2 / ||y||^2 misjudges layers (it
made a planner squeeze the wrong layers to 2 bits). The error is therefore weighted by the diagonal
(empirical) Fisher information of the loss with respect to the layer's output, measured once by one
backward pass over the damage windows:

    F_i[d]  = mean over tokens t of (d NLL / d y_t[d])^2
    D(i, o) = 1/2 * mean over tokens t of sum_d F_i[d] * delta_t[d]^2

D(i, o) is a second-order estimate of the increase in mean token NLL (nats) from quantizing layer i alone
with option o, so the sum over layers predicts a plan's log-perplexity increase (docs/RESULTS.md shows
how well, against measured perplexity); the `optimal` planner minimises that sum under a budget. The
error itself is measured, not modelled: error feedback (GPTQ), partial groups and outliers are all in it.
The layer score (higher = more important) is the damage of the cheapest option, so `lwq` can rank by it.

At a finer `granularity` (``module``, ``fused``: `layerwise.core.types.module_units`) each unit of a layer's
linears is quantized alone, the rest of the layer kept in full precision, giving D(i, unit, o)
(`module_damage`); the layer's D(i, o) is then the sum over its units, the errors taken as additive. That
costs one layer run per unit and distinct option instead of one per option (on the default model with
--target gguf's default options: 30 runs a layer instead of 6).

Cost: one forward and backward pass over `damage_windows` windows (the first of the calibration windows),
then per layer one reference run and one run per option on those windows; the stream advances only them
unless another scorer in the same pass reads more. GPTQ options use Hessians collected during that
reference run (on every streamed window), shared by modules that read the same input.

In a process group (`layerwise.core.dist`) the GPTQ sweeps of a layer's options are dealt among the ranks, and
the layer runs are split one of two ways (`split`):

- ``windows``: each rank runs the reference and every option on its share of the damage windows, and the
  Hessians, Fisher sums and damages are summed over ranks;
- ``options``: each rank runs the reference on every damage window and its share of the option runs on them;
  each damage is measured by one rank and sent to the others.

Per rank and layer, sharing windows costs ``ceil(W / N) * (1 + R)`` layer runs of a window (W damage windows,
N ranks, R option runs), sharing options ``W * (1 + ceil(R / N))``. ``auto`` picks the cheaper: windows, unless
there are fewer windows than ranks or many more runs than windows (docs/RESULTS.md measures both).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from layerwise.core import dist
from layerwise.core.errors import LayerwiseError
from layerwise.core.progress import bar
from layerwise.core.summation import CompensatedSum, exact_total
from layerwise.core.types import QuantSpec, check_granularity, module_units, parse_options, unit_name
from layerwise.importance.base import SCORERS, LayerScorer
from layerwise.model.adapter import decoder_layers, linear_modules, set_submodule
from layerwise.model.driver import LayerStep
from layerwise.model.layer_calls import (
    layer_output,
    nll_sum,
    overridden_forward,
    replace_hidden,
    shifted_targets,
    split_hidden,
)
from layerwise.model.placement import Placement, onloaded, sequential_onload
from layerwise.quant import SharedInputHessians, dense_weights, quantize_modules
from layerwise.quant.gptq import checked_hessians
from layerwise.quant.registry import needs_hessian

# 3- and 4-bit at group 256 as well as 128. Groups are fitted to each module's input width (`QuantSpec.fit`):
# on the default model both become 64 on the 576-wide q/k/v/o/gate/up and stay 128 / 256 on the 1536-wide
# down_proj, so a 3-bit layer costs 3.26 bits at 3:128 and 3.24 at 3:256 (fp16 scales, 3-bit zero points).
# The 256 options keep a 3.25 budget at 3 bits in every layer instead of forcing some to 2 bits, which this
# model does not survive; on 4096-wide models they are the cheap 3.07- and 4.07-bit options (docs/RESULTS.md).
DEFAULT_OPTIONS = "2:128,3:128,3:256,4:128,4:256,8:128"
# 24 windows x 512 tokens: the Fisher pass and the per-option layer runs dominate the scorer's time and
# scale with this. (The curve in docs/RESULTS.md was measured with 32; 24 was chosen to bring the default
# compress under 10 minutes on 2 CPU cores, and its 3.25-bit result is recorded there too.)
DEFAULT_DAMAGE_WINDOWS = 24
# Tokens per piece of the Fisher pass's loss (see `_backward_nll`).
LOSS_CHUNK_TOKENS = 128
# How the layer runs are split among the ranks of a process group (see the module's docstring).
SPLITS = ("auto", "windows", "options")
# Config fields of logit rescaling that `_backward_nll` does not reproduce (Cohere, Granite).
_UNCHUNKED_LOGIT_SCALING = ("logit_scale", "logits_scaling")


@SCORERS.register("sensitivity")
class SensitivityScorer(LayerScorer):
    name: ClassVar[str] = "sensitivity"
    needs_activations: ClassVar[bool] = True
    provides: ClassVar[frozenset[str]] = frozenset({"scores", "option_damage", "module_damage"})
    layer_local: ClassVar[bool] = False  # one whole-model backward pass (Fisher)
    shares_windows: ClassVar[bool] = True  # Fisher sums, damages and Hessians are summed over ranks

    def __init__(
        self,
        options: str | list[str] | list[QuantSpec] = DEFAULT_OPTIONS,
        method: str = "rtn",
        damage_windows: int = DEFAULT_DAMAGE_WINDOWS,
        granularity: str = "layer",
        split: str = "auto",
    ) -> None:
        if isinstance(options, list) and options and isinstance(options[0], QuantSpec):
            self.options: list[QuantSpec] = list(options)  # type: ignore[arg-type]
        else:
            self.options = parse_options(options, default_method=method)  # type: ignore[arg-type]
        check_granularity(granularity)
        if split not in SPLITS:
            raise LayerwiseError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.damage_windows = damage_windows
        self.granularity = granularity
        self.split = split
        self._damage: dict[str, list[float]] = {o.option(): [] for o in self.options}
        self._module_damage: list[dict[str, dict[str, float]]] = []
        self._fisher: list[torch.Tensor] = []
        self._collector: SharedInputHessians | None = None

    def splits_windows(self, model: nn.Module) -> bool:
        group = dist.ranks()
        if self.split != "auto" or group is None:
            return self.split != "options"
        names = list(linear_modules(decoder_layers(model)[0]))
        units = 1 if self.granularity == "layer" else len(module_units(names, self.granularity))
        return choose_split(self.damage_windows, len(self.options) * units, group.world) == "windows"

    def windows_needed(self) -> int:
        return self.leading_windows(self.damage_windows)

    def prepare(self, model: nn.Module, windows: torch.Tensor | None, batch_size: int) -> None:
        assert windows is not None
        if self.sharded:
            dist.check_shareable(self.damage_windows, "damage windows", "damage_windows")
        windows = windows[: self.windows_needed()]
        group = dist.ranks()
        # Split by options, the Fisher pass (a whole-model backward) is still split by windows where it can be.
        across_ranks = self.sharded or (group is not None and windows.shape[0] >= group.world)
        if across_ranks and not self.sharded:
            windows = dist.shard(windows)
        self._fisher = output_fisher(model, windows, batch_size, placement=self.placement, progress=self.progress,
                                     across_ranks=across_ranks)

    def observe(self, step: LayerStep) -> AbstractContextManager[object]:
        # GPTQ options need the layer's Hessians: collected during the stream's own reference run.
        if not any(needs_hessian(o) for o in self.options):
            return nullcontext()
        self._collector = SharedInputHessians(linear_modules(step.layer), across_ranks=self.sharded)
        return self._collector

    @torch.inference_mode()
    def score_layer(self, step: LayerStep, outputs: list[torch.Tensor] | None) -> float:
        assert outputs is not None
        per_batch = step.inputs[0].shape[0]
        n = min(len(step.inputs), -(-self.windows_needed() // per_batch))  # batches covering damage_windows
        inputs, reference = step.inputs[:n], outputs[:n]
        modules = linear_modules(step.layer)
        hessians: dict[str, torch.Tensor] = {}
        if self._collector is not None:
            hessians = checked_hessians(step.index, self._collector)
            self._collector = None
        fisher = self._fisher[step.index].to(reference[0].device, torch.float64)
        jobs = [
            (module, option, hessians.get(name) if needs_hessian(option) else None)
            for option in self.options
            for name, module in modules.items()
        ]
        quantized = iter(quantize_modules(jobs, across_ranks=True))  # GPTQ's sweeps dealt among ranks
        by_option = {option.option(): {name: next(quantized) for name in modules} for option in self.options}
        # Each run's Fisher-weighted squared error per batch; all of a layer's runs are summed over the batches
        # (and the ranks' batches, when sharded) at once, exactly, with the token count, and divided after.
        # Split by options, run r is measured by rank r mod N alone (the others add 0), on every window.
        per_run: list[list[float]] = []
        group = None if self.sharded else dist.ranks()

        def measure(replacements: dict[str, nn.Module]) -> int:
            if group is not None and len(per_run) % group.world != group.rank:
                per_run.append([0.0] * len(inputs))
                return len(per_run) - 1
            with _swapped(step.layer, replacements), dense_weights(replacements.values()):
                per_run.append([
                    exact_total((layer_output(step.layer(x, *step.call.args, **step.call.kwargs)) - y).double() ** 2
                                * fisher)
                    for x, y in zip(inputs, reference, strict=True)
                ])
            return len(per_run) - 1

        if self.granularity == "layer":
            runs = {label: measure(replacements) for label, replacements in by_option.items()}
        else:
            unit_runs = self._unit_runs(list(modules), by_option, measure)
        rows = [[run[b] for run in per_run] + [float(y.shape[0] * y.shape[1])] for b, y in enumerate(reference)]
        *totals, n_tokens = dist.exact_sums(rows, len(per_run) + 1, self.sharded)
        if group is not None:  # each run's one measured total plus zeros: exact in any order
            totals = dist.sum_floats(totals)
        damages = [0.5 * total / n_tokens for total in totals]
        if self.granularity == "layer":
            for label, run in runs.items():
                self._damage[label].append(damages[run])
        else:
            units = {unit: {label: damages[run] for label, run in per_option.items()}
                     for unit, per_option in unit_runs.items()}
            self._module_damage.append(units)
            # A layer's damage per option: the sum over its units, each quantized alone (errors taken as additive).
            for label in by_option:
                self._damage[label].append(sum(options[label] for options in units.values()))
        cheapest = min(self.options, key=lambda o: (o.bits, -o.group_size))
        return self._damage[cheapest.option()][-1]

    def _unit_runs(self, names: list[str], by_option: dict[str, dict[str, nn.Module]],
                   measure: Callable[[dict[str, nn.Module]], int]) -> dict[str, dict[str, int]]:
        """Per unit of `module_units`, per option, the run that quantizes that unit's modules alone (`measure`'s
        index). Options that quantize a unit identically (coinciding once fitted to its widths) share one run."""
        runs: dict[str, dict[str, int]] = {}
        for unit in module_units(names, self.granularity):
            seen: dict[tuple[int, ...], int] = {}
            per_option = runs[unit_name(unit)] = {}
            for label, replacements in by_option.items():
                swapped = {name: replacements[name] for name in unit}
                key = tuple(id(m) for m in swapped.values())
                if key not in seen:
                    seen[key] = measure(swapped)
                per_option[label] = seen[key]
        return runs

    def option_damage(self) -> dict[str, list[float]]:
        return self._damage

    def module_damage(self) -> list[dict[str, dict[str, float]]]:
        return self._module_damage


def choose_split(windows: int, runs: int, world: int) -> str:
    """``windows`` or ``options``: how `world` ranks split a layer's `runs` option runs over `windows` damage
    windows at the least layer runs of a window per rank (see the module's docstring)."""
    if windows < world:
        return "options"
    by_windows = -(-windows // world) * (1 + runs)
    by_options = windows * (1 + -(-runs // world))
    return "windows" if by_windows <= by_options else "options"


def output_fisher(model: nn.Module, windows: torch.Tensor, batch_size: int,
                  chunk_tokens: int = LOSS_CHUNK_TOKENS, *, placement: Placement | None = None,
                  progress: bool = False, across_ranks: bool = False) -> list[torch.Tensor]:
    """Per decoder layer, the mean over tokens of the squared gradient of the NLL w.r.t. its output.

    One forward and backward pass over `windows`; parameters do not get gradients (only the hidden
    states do), and every hook and flag is restored afterwards. Each decoder layer runs under activation
    checkpointing: only its input is kept for the backward pass, which recomputes the layer's internals,
    so memory holds one layer's activations instead of all of them (one extra forward, 1.6 GB less peak
    memory on the default model).

    With a `placement` the pass runs under `sequential_onload`: a layer is on the device during its
    forward, and its recomputation in the backward pass (which calls the layer's forward directly, not
    through the module, so no module hook fires) onloads it again for the time it runs. The saved
    tensors the layer's backward reads are the device copies made then. Each batch's squared gradients are
    summed over its tokens in float64, whatever the placement's dtype, and added into a compensated sum
    (`layerwise.core.summation`), so the vectors (float32) have the same bits however the windows are split
    among ranks (`across_ranks`: each rank read its share).
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device if placement is None else placement.device
    sums: list[CompensatedSum | None] = [None] * len(layers)
    n_tokens = 0
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def make_input_require_grad(module: nn.Module, args: tuple, kwargs: dict):
        return replace_hidden(args, kwargs, split_hidden(args, kwargs)[0].detach().requires_grad_(True))

    def keep_grad(index: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            def accumulate(grad: torch.Tensor) -> None:
                term = grad.detach().double().pow(2).sum(dim=(0, 1)).cpu()
                if sums[index] is None:
                    sums[index] = CompensatedSum(term.numel())
                sums[index].add(term)  # type: ignore[union-attr]

            layer_output(output).register_hook(accumulate)

        return hook

    handles = [layers[0].register_forward_pre_hook(make_input_require_grad, with_kwargs=True)]
    handles += [layer.register_forward_hook(keep_grad(i)) for i, layer in enumerate(layers)]
    checkpointed = {layer: _checkpointed(layer.forward, layer, placement) for layer in layers}
    batches = windows.split(batch_size)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad(), overridden_forward(checkpointed), \
                sequential_onload(model, placement, what="the Fisher pass of sensitivity"):
            for batch in bar(batches, desc="sensitivity: Fisher pass", unit="batch", disable=not progress):
                batch = batch.to(device)
                _backward_nll(model, batch, chunk_tokens)
                n_tokens += batch.shape[0] * batch.shape[1]
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    n_total = dist.sum_floats([float(n_tokens)])[0] if across_ranks else float(n_tokens)
    fisher = []
    for total in sums:
        if total is None:  # no gradient reached the layer's output
            fisher.append(torch.zeros(()))
            continue
        if across_ranks:
            total.merge_ranks()
        fisher.append((total.value() / n_total).float())
    return fisher


def _backward_nll(model: nn.Module, batch: torch.Tensor, chunk_tokens: int) -> None:
    """Backpropagate the summed next-token NLL of `batch`, running the output head a chunk of tokens at a time.

    The (tokens x vocabulary) logits, their log-softmax and their gradient are the largest tensors of the
    pass (3 x 100 MB per 512-token window on the default model); in chunks, memory holds one chunk's worth.
    Models whose logits are rescaled in ways not reproduced here run the head whole.
    """
    targets = shifted_targets(batch)
    head = model.get_output_embeddings()
    config = model.config
    if head is None or any(getattr(config, k, None) is not None for k in _UNCHUNKED_LOGIT_SCALING):
        logits = model(input_ids=batch, use_cache=False).logits
        nll_sum(logits, targets).backward()
        return
    cap = getattr(config, "final_logit_softcapping", None)
    hidden = model.base_model(input_ids=batch, use_cache=False).last_hidden_state
    leaf = hidden.detach().requires_grad_(True)
    for start in range(0, batch.shape[1], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        logits = head(leaf[:, piece]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        nll_sum(logits, targets[:, piece]).backward()
    hidden.backward(leaf.grad)


def _checkpointed(forward, layer: nn.Module | None = None, placement: Placement | None = None):
    """`forward` under activation checkpointing; with a `placement`, the layer is onloaded while `forward`
    runs, in the forward pass (already there: nothing moves) and in the backward's recomputation."""
    if placement is not None:
        assert layer is not None
        plain = forward

        def forward(*args, **kwargs):
            with onloaded(layer, placement):
                return plain(*args, **kwargs)

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


class _swapped:
    """Put quantized modules into a layer for the duration of a `with` block, then restore the originals."""

    def __init__(self, layer: nn.Module, replacements: dict[str, nn.Module]) -> None:
        self.layer = layer
        self.replacements = replacements
        self.originals = {name: layer.get_submodule(name) for name in replacements}

    def __enter__(self) -> None:
        for name, module in self.replacements.items():
            set_submodule(self.layer, name, module)

    def __exit__(self, *exc: object) -> None:
        for name, module in self.originals.items():
            set_submodule(self.layer, name, module)
