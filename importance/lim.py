"""LIM, the Layer Input Modification score.

From "Layer-Wise Quantization: A Pragmatic and Effective Method for Quantizing LLMs Beyond Integer
Bit-Levels" (Dumitru et al., 2024): a layer that changes its input little matters little.

    LIM(i) = - mean over tokens t of cos(x_t, y_t)

where x_t is the hidden state entering decoder layer i at token t and y_t the one leaving it, both
taken from the same calibration windows. The cosine is per token (each hidden vector compared with
itself after the layer), then averaged over every token of every window. The paper's raw LIM is
this negative cosine, so higher already means "changes its input more" = more important; no further
sign flip is needed. Range [-1, 1]; an identity layer scores exactly -1.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from layerwise.core import dist
from layerwise.importance.base import SCORERS, LayerScorer
from layerwise.model.driver import LayerStep


def cos_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of cos(a_t, b_t) in float64 (exact, then rounded once), and the number of tokens."""
    cos = F.cosine_similarity(a.double().flatten(0, -2), b.double().flatten(0, -2), dim=-1)
    return math.fsum(cos.tolist()), cos.numel()


@SCORERS.register("lim")
class LIMScorer(LayerScorer):
    name = "lim"
    needs_activations = True
    shares_windows: ClassVar[bool] = True  # per-window sums, summed exactly over the ranks' windows

    def score_layer(self, step: LayerStep, outputs: list[torch.Tensor] | None) -> float:
        assert outputs is not None
        # Each batch's sum, then an exact sum of those: the same bits however the windows are split among ranks.
        rows = [[*cos_sum(x, y)] for x, y in zip(step.inputs, outputs, strict=True)]
        total, count = dist.exact_sums(rows, 2, self.sharded)
        return -total / count
