"""``quanto`` export: optimum-quanto's serialization, loaded by ``QuantizedModelForCausalLM.from_pretrained``
(or ``requantize`` with the same state dict and map).

Files: config.json, model.safetensors, ``quanto_qmap.json`` (module name -> ``{"weights": "qint4",
"activations": "none"}``), tokenizer files. Facts this relies on (optimum-quanto 0.2.7):

* qint4 / qint2 (`WeightQBitsTensor`): ``w = _scale * data - _shift`` per group, data unsigned in
  ``[0, 2**b)``. The group size is not stored: the loading module derives it from its input width K
  (`QModuleMixin`): 128 if K > 128 and 128 divides K, else the largest of 96, 64, 32 that divides K,
  and per-row (no groups) when K <= 128 or none divides. Groups run along each row, so the grouped
  data is the (N*K/g, g) reshape of the (N, K) codes; ``_scale`` and ``_shift`` are (N*K/g, 1) (per row:
  (N, 1)). ``weight._data._data`` packs that grouped data along its first dimension into uint8: with
  ``r = ceil(R / (8/b))`` byte-rows, element row ``i*r + j`` sits at bit shift ``i*b`` of byte-row j.
* qint8 (`WeightQBytesTensor`): per-row symmetric, ``w = _scale * _data`` with int8 ``_data`` and
  (N, 1) ``_scale``, no zero point.
* Every quantized module also stores scalar ``input_scale`` and ``output_scale`` (1 when activations are
  not quantized); the loader leaves unmatched keys uninitialized, so they must be present.

Mapping: our ``(q - z) * s`` is ``s * q - z * s``, so ``data = q``, ``_scale = s``, ``_shift = z * s``;
in float32 both products and their difference are exact (an 11-bit scale times an integer below
2**8), so the export is exact for float32 checkpoints (float16 / bfloat16 ones round the shift, and
bfloat16 the scale, to the model's dtype). Where quanto's group is finer than ours (ours a multiple of
it), each of our scales is repeated over the quanto groups it covers, which is exact. 3-bit codes go
on the qint4 grid unchanged. Refused, since quanto cannot hold them: a group size that is not a multiple
of quanto's for that width (or grouped weights where quanto uses one scale per row), and 8-bit modules
that are grouped or asymmetric.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from layerwise.output.checkpoint import Checkpoint
from layerwise.output.export_common import (
    EXPORTERS,
    ExportedWeight,
    Exporter,
    ExportSettings,
    Problem,
    dense_state,
    gguf_problems,
    model_dtype,
    non_linear_reasons,
    quantized_weights,
    write_model_files,
)

QMAP_FILE = "quanto_qmap.json"
QTYPES = {2: "qint2", 3: "qint4", 4: "qint4", 8: "qint8"}


def quanto_group_size(in_features: int) -> int | None:
    """The group size quanto's loading module uses for a qint4 / qint2 weight of this input width."""
    group_size = 128
    if in_features <= group_size:
        return None
    while in_features % group_size and group_size > 32:
        group_size -= 32
    return group_size if in_features % group_size == 0 else None


def unfit_reason(w: ExportedWeight) -> tuple[str, str] | None:
    """Why quanto cannot hold `w` exactly, as (kind, reason) (None: it can); kinds share one fix."""
    if w.spec.bits == 8:
        if w.n_groups > 1 or not w.spec.sym:
            return "8-bit", "8-bit with groups or zero points, and quanto's qint8 is one symmetric scale per row"
        return None
    quanto_group = quanto_group_size(w.in_features)
    if quanto_group is None and w.n_groups > 1:
        return "per-row", f"grouped, but quanto uses one scale per row for {w.in_features}-wide inputs"
    if quanto_group is not None and w.width % quanto_group:
        return "group", (f"group {w.width} is not a multiple of quanto's group {quanto_group} for "
                         f"{w.in_features}-wide inputs")
    return None


def _fix(kind: str, widths: list[int]) -> str:
    """What to do about every module of one kind of `unfit_reason`, given their input widths."""
    other = "or export it as compressed-tensors."
    if kind == "8-bit":
        return f"Compress 8-bit layers symmetric with one group per row (8:<input width>:gptq:sym), {other}"
    if kind == "per-row":
        return f"Compress those modules with one group per row, {other}"
    needs = ", ".join(f"{quanto_group_size(w)} for {w}-wide inputs" for w in sorted(set(widths)))
    return f"Compress again with the groups quanto uses ({needs}), {other}"


def pack_rows(data: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's `PackedTensor` layout: element row ``i*r + j`` at bit shift ``i*bits`` of byte-row j."""
    per_byte = 8 // bits
    rows = data.shape[0]
    r = -(-rows // per_byte)
    padded = torch.zeros((r * per_byte, *data.shape[1:]), dtype=torch.int32)
    padded[:rows] = data.to(torch.int32)
    packed = torch.zeros((r, *data.shape[1:]), dtype=torch.int32)
    for i in range(per_byte):
        packed |= padded[i * r:(i + 1) * r] << (bits * i)
    return packed.to(torch.uint8)


def module_tensors(w: ExportedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state-dict entries of quanto's quantized module `w.name` (full names)."""
    prefix = f"{w.name}.weight."
    if w.spec.bits == 8:
        out = {prefix + "_data": (w.codes - w.zeros).to(torch.int8), prefix + "_scale": w.scales.to(dtype)}
    else:
        group = quanto_group_size(w.in_features) or w.in_features
        of_group = torch.arange(0, w.in_features, group) // w.width  # our group of each quanto group
        scales = w.scales[:, of_group].reshape(-1, 1)
        shifts = (w.zeros[:, of_group].to(torch.float32) * w.scales[:, of_group]).reshape(-1, 1)
        bits = 4 if w.spec.bits == 3 else w.spec.bits
        out = {
            prefix + "_data._data": pack_rows(w.codes.reshape(-1, group), bits),
            prefix + "_scale": scales.to(dtype),
            prefix + "_shift": shifts.to(dtype),
        }
    if w.bias is not None:
        out[f"{w.name}.bias"] = w.bias
    out[f"{w.name}.input_scale"] = torch.ones((), dtype=dtype)
    out[f"{w.name}.output_scale"] = torch.ones((), dtype=dtype)
    return out


class QuantoExporter(Exporter):
    name = "quanto"
    title = "an optimum-quanto model"
    advice = "Load it with layerwise.load, or export it as compressed-tensors."

    def check(self, ckpt: Checkpoint, settings: ExportSettings) -> list[Problem]:
        weights = quantized_weights(ckpt.model)
        not_linear = non_linear_reasons(ckpt, weights) + gguf_problems(ckpt.model)
        if not_linear:  # nothing else matters for modules no loader quantizes
            return not_linear
        unfit: dict[tuple[str, str], list[ExportedWeight]] = defaultdict(list)
        for w in weights:
            found = unfit_reason(w)
            if found is not None:
                unfit[found].append(w)
        widths: dict[str, list[int]] = defaultdict(list)
        for (kind, _), found_weights in unfit.items():
            widths[kind] += [w.in_features for w in found_weights]
        return [Problem(reason, _fix(kind, widths[kind]), tuple(w.name for w in found_weights))
                for (kind, reason), found_weights in unfit.items()]

    def write(self, ckpt: Checkpoint, out: Path, settings: ExportSettings) -> None:
        weights = quantized_weights(ckpt.model)
        dtype = model_dtype(ckpt)
        tensors = dense_state(ckpt.model)
        qmap = {}
        for w in weights:
            tensors.update(module_tensors(w, dtype))
            qmap[w.name] = {"weights": QTYPES[w.spec.bits], "activations": "none"}
        write_model_files(ckpt, out, tensors, extra_json={QMAP_FILE: qmap})


EXPORTERS.register(QuantoExporter.name)(QuantoExporter())
