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

import torch
import torch.nn.functional as F

from layerwise.importance.base import SCORERS, LayerScorer
from layerwise.model.driver import LayerStep


def mean_token_cosine(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Mean over all tokens of cos(input, output), computed in float64 for a stable average."""
    total, count = 0.0, 0
    for x, y in zip(inputs, outputs, strict=True):
        cos = F.cosine_similarity(x.double().flatten(0, -2), y.double().flatten(0, -2), dim=-1)
        total += float(cos.sum())
        count += cos.numel()
    return total / count


@SCORERS.register("lim")
class LIMScorer(LayerScorer):
    name = "lim"
    needs_activations = True

    def score_layer(self, step: LayerStep, outputs: list[torch.Tensor] | None) -> float:
        assert outputs is not None
        return -mean_token_cosine(step.inputs, outputs)
