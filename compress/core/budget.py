"""Bit accounting: what a plan costs, counted over the decoder's linear weights.

Average bits = (bits of every decoder linear as stored, scales and zeros included, with the group size
each module really gets, `QuantSpec.fit`) / (number of decoder linear weights). Embeddings, the LM
head and norms are not counted; reports give them separately. A layer kept in full precision is counted
at 16 bits per weight (fp16 storage); a pruned or tied layer costs nothing (a tied layer's weights are
its representative's, stored once), and so do the linears of a dropped sub-layer. The denominator is
always the original model's weight count, so pruning frees budget for the layers that stay.
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
        total += KEEP_BITS * out_f * in_f if spec is None else spec.fit(in_f).storage_bits(out_f, in_f)
    return total


def average_bits(actions: list[LayerAction], shapes: list[LinearShapes]) -> float:
    weights = sum(n_weights(s) for s in shapes)
    return sum(layer_bits(s, a) for s, a in zip(shapes, actions, strict=True)) / weights


def plan_average_bits(plan: Plan, shapes: list[LinearShapes]) -> float:
    return average_bits(plan.layers, shapes)


def group_fits(plan: Plan, shapes: list[LinearShapes]) -> list[str]:
    """Where a module got another group size than its plan entry asks (`QuantSpec.fit`), one line per
    (asked, used, input width), e.g. ``group 128 -> 64 for 576-wide inputs (q_proj, ..., up_proj; 30 layers)``."""
    found: dict[tuple[int | str, int | str, int], tuple[dict[str, None], set[int]]] = {}
    for action, layer_shapes in zip(plan.layers, shapes, strict=True):
        if action.removed:
            continue
        for name, (_, in_f) in layer_shapes.items():
            spec = action.module_spec(name)
            if spec is None or sublayer_of(name) in action.drop:
                continue
            fitted = spec.fit(in_f)
            # A GGUF type falls back to another type (llama.cpp's rule), an integer option to a smaller group.
            asked, used = (spec.gguf, fitted.gguf) if spec.gguf is not None else (spec.group_size, fitted.group_size)
            if used != asked:
                names, layers = found.setdefault((asked, used, in_f), ({}, set()))
                names[name.rsplit(".", 1)[-1]] = None
                layers.add(action.layer)
    lines = []
    for (asked, used, width), (names, layers) in sorted(found.items(), key=str):
        what = "GGUF type" if isinstance(asked, str) else "group"
        target = "one group per row" if used == width else str(used)
        count = f"{len(layers)} layer{'s' if len(layers) > 1 else ''}"
        lines.append(f"{what} {asked} -> {target} for {width}-wide inputs ({', '.join(names)}; {count})")
    return lines
