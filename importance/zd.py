"""ZD, the Z-score Distribution score.

From "Layer-Wise Quantization: A Pragmatic and Effective Method for Quantizing LLMs Beyond Integer
Bit-Levels" (Dumitru et al., 2024). The paper counts a layer's weights that lie far above the
layer's average and, per its abstract, ranks a smaller count as better: a layer with fewer large
weights is more important.

    share(i) = |{w in W_i : (w - mean(W_i)) / std(W_i) > 1}| / |W_i|
    ZD(i)    = -share(i)          (negated so that higher = more important, like every scorer)

W_i is every weight of every linear module of decoder layer i (attention and MLP projections,
flattened together; norms, biases and embeddings excluded); mean and std are over that pooled set.
The z-score is one-sided (z > 1), as the paper states it. It needs no calibration data.
The opposite direction (more large weights = more important) is the planner's
`order="reverse"` with this scorer; the benchmark reports both.
"""

from __future__ import annotations

import torch

from layerwise.importance.base import SCORERS, LayerScorer
from layerwise.model.adapter import linear_modules, linear_weight
from layerwise.model.driver import LayerStep


def z_share_above_one(weights: list[torch.Tensor]) -> float:
    flat = torch.cat([w.detach().reshape(-1).double() for w in weights])
    z = (flat - flat.mean()) / flat.std()
    return float((z > 1).double().mean())


@SCORERS.register("zd")
class ZDScorer(LayerScorer):
    name = "zd"
    needs_activations = False

    def score_layer(self, step: LayerStep, outputs: list[torch.Tensor] | None) -> float:
        return -z_share_above_one([linear_weight(m) for m in linear_modules(step.layer).values()])
