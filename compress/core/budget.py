"""Bit accounting: what a plan costs, counted over the decoder's linear weights.

Average bits = (bits of every decoder linear as stored, scales and zeros included) / (number of
decoder linear weights). Embeddings, the LM head and norms are not counted; reports give them
separately. A layer kept in full precision is counted at 16 bits per weight (fp16 storage); a pruned
or tied layer costs nothing (a tied layer's weights are its representative's, stored once), and so do
the linears of a dropped sub-layer. The denominator is always the original model's weight count, so
pruning frees budget for the layers that stay.
"""

from __future__ import annotations

from layerwise.core.types import LayerAction, LinearShapes, Plan, sublayer_of

KEEP_BITS = 16


def n_weights(shapes: LinearShapes) -> int:
    return sum(out_f * in_f for out_f, in_f in shapes.values())


def layer_bits(shapes: LinearShapes, action: LayerAction) -> int:
    if action.removed:
        return 0
    total = 0
    for name, (out_f, in_f) in shapes.items():
        if sublayer_of(name) in action.drop:
            continue
        spec = action.module_spec(name)
        total += KEEP_BITS * out_f * in_f if spec is None else spec.storage_bits(out_f, in_f)
    return total


def average_bits(actions: list[LayerAction], shapes: list[LinearShapes]) -> float:
    weights = sum(n_weights(s) for s in shapes)
    return sum(layer_bits(s, a) for s, a in zip(shapes, actions, strict=True)) / weights


def plan_average_bits(plan: Plan, shapes: list[LinearShapes]) -> float:
    return average_bits(plan.layers, shapes)
