"""Export a layerwise checkpoint to a format that loaders without layerwise read.

``hf``: a plain Hugging Face directory (config.json, model.safetensors, tokenizer files) that
`AutoModelForCausalLM.from_pretrained` loads in a process that never imports layerwise. Plain
transformers can represent a model with fewer layers (config.json says how many), so pruned-only
checkpoints export; quantized modules (layerwise's packed format), tied layers (shared weights) and
dropped sub-layers have no plain-HF form, and such checkpoints are refused with the reason.

``compressed-tensors`` (`layerwise.output.export_compressed_tensors`): pack-quantized, per-module bits, read by
transformers (and vLLM). ``quanto`` (`layerwise.output.export_quanto`): optimum-quanto's qint2/qint4/qint8
serialization. Both hold pruned and quantized layers; both refuse ties, dropped sub-layers and the
bitsandbytes methods, and name any module whose grouping they cannot represent exactly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Imported for their registrations in EXPORTERS.
import layerwise.output.export_compressed_tensors  # noqa: F401
import layerwise.output.export_quanto  # noqa: F401
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import Plan, write_file_atomic
from layerwise.model.loading import quiet_transformers
from layerwise.output.checkpoint import (
    Checkpoint,
    atomic_dir,
    check_output_dir,
    check_output_file,
    load_checkpoint,
    read_meta,
)
from layerwise.output.export_common import (
    EXPORTERS,
    Exporter,
    ExportSettings,
    Problem,
    check_target,
    describe_layers,
    refuse,
    structure_blockers,
)
from layerwise.output.export_gguf import EMBEDDING_TYPES
from layerwise.output.paths import check_not_inside


class HfExporter(Exporter):
    name = "hf"
    title = "a plain Hugging Face model"
    advice = ("Plain transformers represents pruned layers only; load this checkpoint with layerwise.load, "
              "or export quantized checkpoints with --format compressed-tensors or quanto")

    def blockers(self, plan: Plan) -> list[Problem]:
        quantized = tuple(a.layer for a in plan.layers if a.action == "quantize" or a.overrides)
        verb = "is" if len(quantized) == 1 else "are"
        problems = [Problem(f"{describe_layers(quantized)} {verb} quantized", self.advice)] if quantized else []
        return problems + structure_blockers(plan)

    def write(self, ckpt: Checkpoint, out: Path, settings: ExportSettings) -> None:
        with quiet_transformers():
            ckpt.model.save_pretrained(out)
            if ckpt.tokenizer is not None:
                ckpt.tokenizer.save_pretrained(out)


EXPORTERS.register(HfExporter.name)(HfExporter())
EXPORT_FORMATS = ("hf", "compressed-tensors", "quanto", "gguf")


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf", *,
                      overwrite: bool = False, three_bit_as_four: bool = False, target: str | None = None,
                      gguf_embeddings: str = "q8_0") -> Path:
    """Write checkpoint `path` in format `fmt` to directory `out`, atomically.

    Refuses, before writing anything, what `fmt` cannot hold exactly: first from layerwise.json (ties,
    dropped sub-layers, ...), then from the loaded modules (group sizes a format cannot express), then
    what `target` (``vllm``) cannot run. `three_bit_as_four` writes 3-bit modules of a compressed-tensors
    export on the 4-bit grid, for readers that predate its dense 3-bit packing. ``gguf`` writes one file
    `out`; `gguf_embeddings` (``q8_0``, ``f16``, ``f32``) is the type of its embedding and untied head.
    """
    check_not_inside(out, [path], "checkpoint")
    exporter = EXPORTERS.get(fmt)
    if gguf_embeddings not in EMBEDDING_TYPES:
        raise LayerwiseError(f"unknown GGUF embedding type {gguf_embeddings!r}; choose one of "
                             f"{', '.join(EMBEDDING_TYPES)}")
    settings = ExportSettings(three_bit_as_four=three_bit_as_four, target=check_target(target),
                              gguf_embeddings=gguf_embeddings)
    plan = Plan.from_dict(read_meta(path)["plan"])
    blockers = exporter.blockers(plan)
    if blockers:
        raise refuse(path, exporter, blockers)
    out = check_output_file(out, overwrite) if exporter.single_file else check_output_dir(out, overwrite)
    ckpt = load_checkpoint(path)
    problems = exporter.check(ckpt, settings)
    if problems:
        raise refuse(path, exporter, problems)
    said: list[str | None] = []
    if exporter.single_file:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(out, lambda tmp: said.append(exporter.write(ckpt, tmp, settings)))
    else:
        with atomic_dir(out) as tmp:
            said.append(exporter.write(ckpt, tmp, settings))
    if said and said[0]:
        print(f"layerwise: export: {said[0]}", file=sys.stderr)
    return out
