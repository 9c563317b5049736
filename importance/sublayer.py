"""Sub-layer importance: how much the attention and the MLP of a layer turn the residual stream.

From "What Matters in Transformers? Not All Attention is Needed" (He et al., 2024, LLM-Drop). With X
the hidden state entering a decoder layer, A what its attention adds to the residual stream, H = X + A,
and M what its MLP adds (so the layer's output is Y = H + M):

    attn(l) = 1 - mean over tokens t of cos(X_t, H_t)
    mlp(l)  = 1 - mean over tokens t of cos(H_t, H_t + M_t)
    score(l) = 1 - mean over tokens t of cos(X_t, Y_t)        (ShortGPT's Block Influence)

stored as `module_scores["attn"]`, `module_scores["mlp"]` and `scores`; all in [0, 2], 0 for a sub-layer
(layer) that adds nothing. The means run over every token of every calibration window. A and M are read
by forward hooks on the modules whose outputs are added to the residual stream
(`layerwise.model.adapter.contribution_names`: the attention / MLP module, gemma's post-norms, OPT's fc2)
during the layer's reference run; a tuple output contributes its first item. This assumes a pre-norm
layer (output = X + A + M); a layer whose output differs from H + M (post-norm) is refused.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from layerwise.core import dist
from layerwise.core.errors import LayerwiseError
from layerwise.importance.base import SCORERS, LayerScorer
from layerwise.importance.lim import cos_sum
from layerwise.model.adapter import contribution_names
from layerwise.model.driver import LayerStep
from layerwise.model.layer_calls import layer_output


@SCORERS.register("sublayer")
class SublayerScorer(LayerScorer):
    name: ClassVar[str] = "sublayer"
    needs_activations: ClassVar[bool] = True
    provides: ClassVar[frozenset[str]] = frozenset({"scores", "module_scores"})
    shares_windows: ClassVar[bool] = True  # per-window sums, summed exactly over the ranks' windows

    def __init__(self) -> None:
        self._seen: dict[str, list[torch.Tensor]] = {}
        self._scores: dict[str, list[float]] = {"attn": [], "mlp": []}

    def observe(self, step: LayerStep) -> AbstractContextManager[object]:
        return self._recording(step.layer)

    @contextmanager
    def _recording(self, layer: nn.Module):
        self._seen = {"attn": [], "mlp": []}

        def record(sublayer: str):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                self._seen[sublayer].append(layer_output(output).detach())

            return hook

        handles = [layer.get_submodule(name).register_forward_hook(record(sublayer))
                   for sublayer, name in contribution_names(layer).items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def score_layer(self, step: LayerStep, outputs: list[torch.Tensor] | None) -> float:
        assert outputs is not None
        seen, self._seen = self._seen, {}
        rows = []
        for x, attn, mlp, y in zip(step.inputs, seen["attn"], seen["mlp"], outputs, strict=True):
            h = x.double() + attn.double()
            if float((h + mlp.double() - y.double()).norm()) > 1e-2 * float(y.double().norm()):
                raise LayerwiseError(
                    f"layer {step.index}: the attention and MLP contributions do not add up to the layer's "
                    "output (a post-norm layer?); the sublayer scorer needs a pre-norm decoder layer"
                )
            (attn_sum, n), (mlp_sum, _), (layer_sum, _) = (cos_sum(x, h), cos_sum(h, h + mlp.double()), cos_sum(x, y))
            rows.append([attn_sum, mlp_sum, layer_sum, float(n)])
        attn_sum, mlp_sum, layer_sum, n_tokens = dist.exact_sums(rows, 4, self.sharded)
        self._scores["attn"].append(1.0 - attn_sum / n_tokens)
        self._scores["mlp"].append(1.0 - mlp_sum / n_tokens)
        return 1.0 - layer_sum / n_tokens

    def module_scores(self) -> dict[str, list[float]]:
        return self._scores
