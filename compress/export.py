"""Export a layerwise checkpoint to a format that loaders without layerwise read.

``hf``: a plain Hugging Face directory (config.json, model.safetensors, tokenizer files) that
`AutoModelForCausalLM.from_pretrained` loads in a process that never imports layerwise. Plain
transformers can represent a model with fewer layers (config.json says how many), so pruned-only
checkpoints export; quantized modules (layerwise's packed format), tied layers (shared weights) and
dropped sub-layers have no plain-HF form, and such checkpoints are refused with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

from layerwise.checkpoint import atomic_dir, check_output_dir, load_checkpoint, read_meta
from layerwise.errors import LayerwiseError
from layerwise.loading import quiet_transformers
from layerwise.types import Plan

EXPORT_FORMATS = ("hf",)


def hf_blockers(plan: Plan) -> list[str]:
    """Why a plan's model cannot be written as a plain HF checkpoint (empty: it can)."""
    reasons = []
    for kind, layers in (
        ("are quantized", [a.layer for a in plan.layers if a.action == "quantize" or a.overrides]),
        ("are tied to other layers", [a.layer for a in plan.layers if a.action == "tie"]),
        ("have dropped sub-layers", [a.layer for a in plan.layers if a.drop]),
    ):
        if layers:
            reasons.append(f"layers {layers} {kind}")
    return reasons


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf", *,
                      overwrite: bool = False) -> Path:
    """Write checkpoint `path` in format `fmt` to directory `out`, atomically; refuses what `fmt` cannot hold."""
    if fmt not in EXPORT_FORMATS:
        raise LayerwiseError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    plan = Plan.from_dict(read_meta(path)["plan"])
    blockers = hf_blockers(plan)
    if blockers:
        raise LayerwiseError(
            f"checkpoint {path} cannot be exported as a plain Hugging Face model: {'; '.join(blockers)}. "
            "Plain transformers represents pruned layers only; load this checkpoint with layerwise.load"
        )
    out = check_output_dir(out, overwrite)
    ckpt = load_checkpoint(path)
    with atomic_dir(out) as tmp, quiet_transformers():
        ckpt.model.save_pretrained(tmp)
        if ckpt.tokenizer is not None:
            ckpt.tokenizer.save_pretrained(tmp)
    return out
