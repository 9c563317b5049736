"""Angular distance between the hidden states entering layer l and layer l + n.

From "The Unreasonable Ineffectiveness of the Deeper Layers" (Gromov et al., 2024): a block of n
layers whose output hardly differs in direction from its input can be pruned. With x^l the hidden
state entering decoder layer l (x^N: the output of the last decoder layer, before the final norm),

    d(x^l, x^{l+n}) = mean over sampled tokens t of arccos(cos(x^l_t, x^{l+n}_t)) / pi      in [0, 1]

`block_distance[str(n)][l]` holds d(x^l, x^{l+n}) for n = 1..N and l = 0..N-n (so the list for n has
N - n + 1 entries; the paper prunes the block l..l+n-1 with the smallest). The layer score is
`block_distance["1"][l]`: a layer that turns its input little is unimportant (identity layer: 0).

Tokens: the paper reads only the last token of each sequence; an average over more tokens is steadier.
Per window this reads every `stride`-th position counted back from the last (the last included,
position 0 never: the first token is an attention sink whose state barely changes in most LLMs). Every
layer's sampled states are kept until the end, (N + 1) x windows x ceil((length - 1) / stride) x
hidden float32 values: for the default model (30 layers, hidden 576) on 64 windows of 512 tokens with
the default stride 16, 31 x 64 x 32 x 576 x 4 bytes = 146 MB (on each of N ranks, its share: 1/N of that).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from layerwise.core import dist
from layerwise.importance.base import SCORERS, LayerScorer
from layerwise.model.driver import LayerStep

DEFAULT_STRIDE = 16


def sampled_positions(length: int, stride: int) -> list[int]:
    """Every `stride`-th position counted back from the last, never position 0 (unless it is the only one)."""
    return sorted(range(length - 1, 0, -stride)) or [0]


def arccos_sums(a: torch.Tensor, b: torch.Tensor, per_window: int) -> torch.Tensor:
    """Per window (`per_window` consecutive rows each): the sum over its rows of arccos(cos(a_t, b_t)), in
    float64."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1.0, 1.0)
    return torch.arccos(cos).view(-1, per_window).sum(1)


@SCORERS.register("angular")
class AngularScorer(LayerScorer):
    name: ClassVar[str] = "angular"
    needs_activations: ClassVar[bool] = True
    provides: ClassVar[frozenset[str]] = frozenset({"scores", "block_distance"})
    shares_windows: ClassVar[bool] = True  # per-window sums, summed exactly over the ranks' windows

    def __init__(self, stride: int = DEFAULT_STRIDE) -> None:
        if stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride}")
        self.stride = stride
        self._states: list[torch.Tensor] = []  # sampled x^l for l = 0..(layers seen so far)
        self._last: torch.Tensor | None = None  # sampled output of the latest layer seen
        self._per_window = 1  # sampled positions per window

    def _sample(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        positions = sampled_positions(hidden[0].shape[1], self.stride)
        self._per_window = len(positions)
        return torch.cat([h[:, positions].flatten(0, 1).float().cpu() for h in hidden])

    def _distances(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        """d(a, b) of each pair of sampled states: per-window sums, summed exactly over every window (the ranks'
        too, when sharded), so the same windows give the same bits however they are split."""
        columns = [arccos_sums(a, b, self._per_window) for a, b in pairs]
        counts = torch.full_like(columns[0], float(self._per_window))
        rows = torch.stack([*columns, counts], dim=1).tolist()
        *totals, count = dist.exact_sums(rows, len(pairs) + 1, self.sharded)
        return [total / count / math.pi for total in totals]

    def score_layer(self, step: LayerStep, outputs: list[torch.Tensor] | None) -> float:
        assert outputs is not None
        self._states.append(self._sample(step.inputs))
        self._last = self._sample(outputs)
        return self._distances([(self._states[-1], self._last)])[0]

    def block_distance(self) -> dict[str, list[float]]:
        if self._last is None:
            return {}
        states = [*self._states, self._last]
        n_layers = len(self._states)
        blocks = [(n, start) for n in range(1, n_layers + 1) for start in range(n_layers - n + 1)]
        distances = self._distances([(states[start], states[start + n]) for n, start in blocks])
        by_size: dict[str, list[float]] = {str(n): [] for n in range(1, n_layers + 1)}
        for (n, _), distance in zip(blocks, distances, strict=True):
            by_size[str(n)].append(distance)
        return by_size
