"""The compression report: per-layer score, bits and weight error, and the totals users budget with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from layerwise.core.budget import KEEP_BITS, group_fits, layer_bits, n_weights
from layerwise.core.types import LayerAction, LayerOutcome, LayerScores, LinearShapes, Plan, QuantSpec
from layerwise.model.adapter import decoder_layers, linear_modules


@dataclass
class LayerRow:
    layer: int
    score: float | None
    action: str
    bits: int | None
    group_size: int | None
    method: str | None
    avg_bits: float  # this layer's bits per weight, scale/zero overhead included
    rel_error: float | None  # ||W - Q(W)||_F / ||W||_F over the layer's linears together
    note: str = ""  # structure: "tied to 3", "attn dropped"


@dataclass
class Report:
    model: str
    scorer: str | None
    planner: str | None
    rows: list[LayerRow]
    target_bits: float | None
    avg_bits: float
    decoder_weights: int
    decoder_bytes_before: int  # decoder linears in the original dtype
    decoder_bytes_fp16: int
    decoder_bytes_after: int
    other_bytes: int  # embeddings, head, norms: not counted in the budget, kept as they are
    metrics: dict[str, Any] = field(default_factory=dict)
    # Where an option's group size does not divide a module's input width and a smaller one is used
    # (`layerwise.core.budget.group_fits`); the rows show the group size the plan asks for.
    group_fits: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        rows = [LayerRow(**r) for r in data.get("rows", [])]
        return cls(**{**data, "rows": rows})

    def to_text(self) -> str:
        lines = [
            f"model: {self.model}   scorer: {self.scorer}   planner: {self.planner}",
            f"{'layer':>5} {'score':>9} {'action':>8} {'bits':>4} {'group':>5} {'method':>6} "
            f"{'bits/w':>7} {'rel.err':>8}  note",
        ]
        for r in self.rows:
            score = "" if r.score is None else f"{r.score:9.4f}"
            err = "" if r.rel_error is None else f"{r.rel_error:8.4f}"
            lines.append(
                f"{r.layer:>5} {score:>9} {r.action:>8} {r.bits or '':>4} {r.group_size or '':>5} "
                f"{r.method or '':>6} {r.avg_bits:7.3f} {err:>8}  {r.note}".rstrip()
            )
        mib = 1024 * 1024
        target = "" if self.target_bits is None else f" (target {self.target_bits})"
        lines += [
            f"average bits per decoder weight, scale/zero overhead included: {self.avg_bits:.4f}{target}",
            f"decoder linears: {self.decoder_weights:,} weights, {self.decoder_bytes_before / mib:.1f} MiB before "
            f"({self.decoder_bytes_fp16 / mib:.1f} MiB as fp16), {self.decoder_bytes_after / mib:.1f} MiB after",
            f"not counted (embeddings, head, norms; kept as is): {self.other_bytes / mib:.1f} MiB",
        ]
        lines += [f"group size fitted to the input width: {fit}" for fit in self.group_fits]
        for key, value in self.metrics.items():
            lines.append(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
        return "\n".join(lines)


def _note(action: LayerAction) -> str:
    if action.action == "tie":
        return f"tied to {action.tie_to}"
    notes = [f"GGUF {action.gguf}"] if action.gguf else []
    notes += [f"{' and '.join(action.drop)} dropped"] if action.drop else []
    by_spec: dict[QuantSpec, list[str]] = {}
    for name, spec in action.overrides.items():
        by_spec.setdefault(spec, []).append(name.rsplit(".", 1)[-1])
    for spec, names in by_spec.items():
        what = spec.gguf or f"{spec.bits}b g{spec.group_size}{' sym' if spec.sym else ''}"
        notes.append(f"{'/'.join(names)} {what}")
    return ", ".join(notes)


def build_report(
    model: nn.Module,
    plan: Plan,
    outcomes: list[LayerOutcome],
    shapes: list[LinearShapes],
    *,
    model_name: str,
    original_element_bytes: int,
    scores: LayerScores | None = None,
) -> Report:
    """Rows for every layer of `plan` (original numbering, pruned layers included); `outcomes` carry
    their original layer index, and layers without one (pruned, tied) show no error. `scores` may
    number the original layers or the kept ones."""
    by_layer = {o.layer: o for o in outcomes}
    score_of: dict[int, float] = {}
    if scores is not None:  # scored before restructuring (all layers) or after (the kept ones)
        numbering = range(plan.n_layers) if scores.n_layers == plan.n_layers else plan.kept_layers()
        score_of = dict(zip(numbering, scores.scores, strict=True))
    rows = []
    for action, layer_shapes in zip(plan.layers, shapes, strict=True):
        outcome = by_layer.get(action.layer)
        weights = n_weights(layer_shapes)
        rows.append(
            LayerRow(
                layer=action.layer,
                score=score_of.get(action.layer),
                action=action.action,
                bits=action.bits if action.action == "quantize" else None,
                group_size=action.group_size if action.action == "quantize" else None,
                method=action.method,
                avg_bits=layer_bits(layer_shapes, action) / weights,
                rel_error=None if outcome is None else outcome.layer_error(),
                note=_note(action),
            )
        )
    total_weights = sum(n_weights(s) for s in shapes)
    bits_after = sum(layer_bits(s, a) for s, a in zip(shapes, plan.layers, strict=True))
    decoder_param_ids = {
        id(p) for layer in decoder_layers(model) for m in linear_modules(layer).values() for p in m.parameters()
    }
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in decoder_param_ids)
    return Report(
        model=model_name,
        scorer=plan.made_by.get("scorer"),
        planner=plan.made_by.get("planner"),
        rows=rows,
        target_bits=plan.target_bits,
        avg_bits=bits_after / total_weights,
        decoder_weights=total_weights,
        decoder_bytes_before=total_weights * original_element_bytes,
        decoder_bytes_fp16=total_weights * KEEP_BITS // 8,
        decoder_bytes_after=bits_after // 8,
        other_bytes=other,
        group_fits=group_fits(plan, shapes),
    )

