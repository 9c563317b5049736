"""Greedy layer removal by calibration loss, like SLEB.

From "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks"
(Song et al., 2024). Starting from the whole model, each round removes the one decoder layer whose
removal raises the mean next-token NLL on the calibration windows least (ties: the lower index), until
`max_remove` layers are gone (default: a third of the layers, at least 1). The paper's metric is the
same loss (it reports it as perplexity); it re-evaluates every remaining layer after each removal, so a
layer that was harmless alone but not next to another removed one is caught.

Scores are ranks (0 = least important): the layer removed in round k scores k (k = 0..R-1); the layers
never removed score R..N-1, ordered by how much their removal alone raised the loss in the first round.
So a layer removed earlier ranks below one removed later, and every removed layer below every kept one.
After `prepare`, `order` lists the removed layers, `step_nll[k]` the loss after round k, `base_nll` the
loss of the whole model and `first_round_nll[i]` the loss without layer i alone (kept on the scorer,
not in the scores file: `LayerScores` has no field for them).

The removal is exact, done through the model's own forward (so every architecture's masks, final norm,
head and logit soft-capping are its own): a removed layer's forward is replaced, for the duration of
a pass, by one that returns its input. Each candidate starts from the cached input of the removed layer
(layers before it are skipped and it returns the cached state), so only the layers after it run:
about half a forward per candidate. Cost: sum over rounds of (layers left) such evaluations, plus one
full forward per round to refresh the cache, on `windows` windows; the cache holds every layer's input
hidden states on them (default model, 16 windows of 512 tokens in float32: 30 x 19 MB = 0.57 GB; each of N
ranks holds its share, 1/N of that). With a placement the forwards run there layer by layer
(`sequential_onload`; bypassed layers are not moved) and the cache is on its device, in its dtype (an 8B
llama in bf16: 32 x 67 MB = 2.1 GB).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from layerwise.core import dist
from layerwise.importance.base import SCORERS, LayerScorer
from layerwise.model.adapter import decoder_layers
from layerwise.model.driver import LayerStep, window_batches
from layerwise.model.layer_calls import nll_sum, overridden_forward, shifted_targets, split_hidden
from layerwise.model.placement import pass_through, sequential_onload

# 16 windows x 512 tokens = 8 k tokens: each round compares whole-model losses, whose differences between
# candidates are far above the token-sampling noise at that size, while the cost (about N^2 / 6 forwards
# for N layers and the default N / 3 removals) grows linearly with the windows.
DEFAULT_WINDOWS = 16


@contextmanager
def bypassed(layers: nn.ModuleList, skip: set[int], replace: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
    """Layers in `skip` return their input, layers in `replace` the given hidden state, without running.

    Each is done by an instance-level `forward` for the duration of the block; a forward already set on
    the instance (e.g. by accelerate's hooks) is put back afterwards.
    """
    replace = replace or {}

    def passing(index: int):
        @pass_through  # reads no weights: `sequential_onload` leaves the layer home
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            return replace[index] if index in replace else split_hidden(args, kwargs)[0]

        return forward

    with overridden_forward({layers[i]: passing(i) for i in skip | set(replace)}):
        yield


def batch_nll(model: nn.Module, batch: torch.Tensor) -> float:
    """Summed next-token NLL of a batch of windows under the model's own forward."""
    return float(nll_sum(model(input_ids=batch, use_cache=False).logits, shifted_targets(batch)))


@SCORERS.register("ppl_drop")
class PplDropScorer(LayerScorer):
    name: ClassVar[str] = "ppl_drop"
    needs_activations: ClassVar[bool] = True
    needs_stream: ClassVar[bool] = False
    layer_local: ClassVar[bool] = False  # whole-model forwards
    shares_windows: ClassVar[bool] = True  # per-window losses, summed exactly over the ranks' windows

    def __init__(self, max_remove: int | None = None, windows: int = DEFAULT_WINDOWS) -> None:
        if (max_remove is not None and max_remove < 1) or windows < 1:
            raise ValueError(f"max_remove and windows must be positive, got {max_remove} and {windows}")
        self.max_remove = max_remove
        self.windows = windows
        self.order: list[int] = []
        self.step_nll: list[float] = []
        self.base_nll = math.nan
        self.first_round_nll: list[float] = []
        self._scores: list[float] = []

    def splits_windows(self, model: nn.Module) -> bool:
        return dist.shareable(self.windows)  # else every rank reads the few windows whole

    def windows_needed(self) -> int:
        return self.leading_windows(self.windows)

    @torch.inference_mode()
    def prepare(self, model: nn.Module, windows: torch.Tensor | None, batch_size: int) -> None:
        assert windows is not None
        layers = decoder_layers(model)
        n_layers = len(layers)
        n_remove = min(self.max_remove or max(1, n_layers // 3), n_layers - 1)
        device = next(model.parameters()).device if self.placement is None else self.placement.device
        batches = [b.to(device) for b in window_batches(windows[: self.windows_needed()], batch_size)]
        n_targets = self._summed([[float(b.shape[0] * (b.shape[1] - 1))] for b in batches])[0]
        was_training = model.training
        model.eval()
        removed: list[int] = []
        bar = tqdm(total=sum(n_layers - r for r in range(n_remove)), desc="ppl_drop", unit="candidate",
                   disable=not self.progress)
        try:
            with sequential_onload(model, self.placement, what="ppl_drop's whole-model forwards"):
                cache, nlls = self._layer_inputs(model, layers, batches, set())
                self.base_nll = self._summed([[nll] for nll in nlls])[0] / n_targets
                for _ in range(n_remove):
                    candidates = [i for i in range(n_layers) if i not in removed]
                    per_batch = [[0.0] * len(candidates) for _ in batches]  # summed over batches (and ranks)
                    for c, i in enumerate(candidates):
                        skip = set(removed) | set(range(i))
                        for b, batch in enumerate(batches):
                            with bypassed(layers, skip, {i: cache[i][b]}):
                                per_batch[b][c] = batch_nll(model, batch)
                        bar.update()
                    totals = self._summed(per_batch, len(candidates))
                    losses = {i: total / n_targets for i, total in zip(candidates, totals, strict=True)}
                    if not removed:
                        self.first_round_nll = [losses[i] for i in range(n_layers)]
                    best = min(losses, key=lambda i: (losses[i], i))
                    removed.append(best)
                    self.step_nll.append(losses[best])
                    if len(removed) < n_remove:
                        del cache  # free the old inputs before computing the new ones
                        cache, _ = self._layer_inputs(model, layers, batches, set(removed))
        finally:
            bar.close()
            model.train(was_training)
        self.order = removed
        first = self.first_round_nll or [0.0] * n_layers  # empty only for a one-layer model
        kept = sorted((i for i in range(n_layers) if i not in removed), key=lambda i: (first[i], i))
        self._scores = [0.0] * n_layers
        for rank, i in enumerate([*removed, *kept]):
            self._scores[i] = float(rank)

    def _summed(self, rows: list[list[float]], width: int = 1) -> list[float]:
        """Column sums over the batches' rows (and the ranks', when sharded), exact then rounded once: the same
        windows give the same bits however they are split among ranks."""
        return dist.exact_sums(rows, width, self.sharded)

    @staticmethod
    def _layer_inputs(
        model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], removed: set[int]
    ) -> tuple[list[list[torch.Tensor]], list[float]]:
        """Per layer and batch, the hidden state entering it in the model without the `removed` layers,
        and that model's summed NLL on each batch."""
        cache: list[list[torch.Tensor]] = [[] for _ in layers]

        def record(index: int):
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                cache[index].append(split_hidden(args, kwargs)[0])

            return hook

        handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            with bypassed(layers, removed):
                nlls = [batch_nll(model, batch) for batch in batches]
        finally:
            for handle in handles:
                handle.remove()
        return cache, nlls

    def score_layer(self, step: LayerStep, outputs: list[torch.Tensor] | None) -> float:
        return self._scores[step.index]
