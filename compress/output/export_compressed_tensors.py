"""``compressed-tensors`` export: the ``pack-quantized`` format vLLM and transformers read.

Facts this relies on (compressed-tensors 0.18+ / 0.20, `PackedQuantizationCompressor`, `pack_to_int32` and
`_dequantize`; vLLM 0.33.0's `CompressedTensorsWNA16`, see docs/export.md):

* A module's stored codes are signed, ``x_q in [-2**(b-1), 2**(b-1))``, and its weight is
  ``(x_q - zero_point) * scale`` computed in the scale's dtype (the model's dtype), with
  ``zero_point = 0`` when the scheme is symmetric (and then not stored).
* ``weight_packed`` (int32, (N, ceil(K*b/32))) holds ``x_q + 2**(b-1)`` as a dense little-endian
  bitstream per row -- element k at stream bits ``[k*b, (k+1)*b)`` -- which is layerwise's own
  ``bitstream-v1`` layout bit for bit, for every b from 2 to 8 (3-bit codes cross word boundaries;
  compressed-tensors packs so since 0.18.0, 0.17 put ten 3-bit codes in a word). ``weight_zero_point``
  (asymmetric only) is packed the same way down the output dimension: int32 (ceil(N*b/32), G), which is
  how layerwise stores zero points (`layerwise.core.bitstream.pack_zeros`). ``weight_scale`` is (N, G);
  ``weight_shape`` the int64 pair (N, K).
* Strategy ``group`` needs K to be a multiple of the group size; layerwise fits every module's group to
  its input width (`QuantSpec.fit`), so only checkpoints of format version 1 can have a shorter last
  group, and those are refused. A row that is a single group is written as strategy ``channel``.

Our weight is ``(q - z) * s`` with unsigned codes q, so ``x_q = q - 2**(b-1)`` and ``zero_point =
z - 2**(b-1)``: the packed words are ours unchanged. The scales are written as the fp16 values layerwise
stores; a loader that builds float32 scale parameters widens them exactly, so a float32 export computes
our weights exactly (a bfloat16 model rounds the scales to bfloat16). Per-module bits become one config
group per distinct (bits, strategy, group size, symmetry), whose ``targets`` are the exact module names.

`ExportSettings.three_bit_as_four` writes 3-bit modules on the 4-bit grid instead, exactly (asymmetric
codes and zero points stay the same numbers; symmetric codes move up by 4 so the scheme stays symmetric),
at 4 bits per weight, for readers older than dense packing. With ``target="vllm"`` the export also
refuses what vLLM cannot load (`vllm_problems`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from layerwise.core.bitstream import pack, pack_zeros
from layerwise.core.types import FUSED_SETS, fitted_group_size
from layerwise.output.checkpoint import Checkpoint
from layerwise.output.export_common import (
    EXPORTERS,
    ExportedWeight,
    Exporter,
    ExportSettings,
    Problem,
    dense_state,
    gguf_problems,
    non_linear_reasons,
    quantized_weights,
    write_model_files,
)

FORMAT = "pack-quantized"
DEFAULT_SETTINGS = ExportSettings()


def exported_bits(bits: int, settings: ExportSettings) -> int:
    """The code width a `bits`-bit module is written with."""
    return 4 if bits == 3 and settings.three_bit_as_four else bits


def _scheme_key(w: ExportedWeight, settings: ExportSettings) -> tuple[int, str, int | None, bool]:
    strategy = "channel" if w.n_groups == 1 else "group"
    return (exported_bits(w.spec.bits, settings), strategy, None if strategy == "channel" else w.width,
            w.spec.sym)


def _codes_and_zeros(w: ExportedWeight, settings: ExportSettings) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Unsigned codes and zero points on the exported grid; the same weight ``(q - z) * s``."""
    bits = exported_bits(w.spec.bits, settings)
    shift = 2 ** (bits - 1) - 2 ** (w.spec.bits - 1) if w.spec.sym else 0
    return w.codes + shift, w.zeros + shift, bits


def module_tensors(w: ExportedWeight, settings: ExportSettings = DEFAULT_SETTINGS) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for module `w.name` (full names)."""
    codes, zeros, bits = _codes_and_zeros(w, settings)
    out = {
        f"{w.name}.weight_packed": pack(codes, bits),
        f"{w.name}.weight_scale": w.scales.to(torch.float16),  # the stored fp16 values, exactly
        f"{w.name}.weight_shape": torch.tensor([w.out_features, w.in_features], dtype=torch.int64),
    }
    if not w.spec.sym:
        out[f"{w.name}.weight_zero_point"] = pack_zeros(zeros, bits)
    if w.bias is not None:
        out[f"{w.name}.bias"] = w.bias
    return out


def ragged_problems(weights: list[ExportedWeight]) -> list[Problem]:
    """Modules with a last group shorter than the others (checkpoint format 1), one problem per (group, width)."""
    found: dict[tuple[int, int], list[str]] = defaultdict(list)
    for w in weights:
        if w.n_groups > 1 and w.in_features % w.width:
            found[(w.width, w.in_features)].append(w.name)
    return [Problem(f"group {group} does not divide the {width}-wide input, and compressed-tensors' groups must",
                    f"Compress again with this layerwise, which fits each group to its input width "
                    f"(group {group} -> {fitted_group_size(group, width)} for {width}-wide inputs).", tuple(names))
            for (group, width), names in found.items()]


def vllm_problems(weights: list[ExportedWeight], settings: ExportSettings) -> list[Problem]:
    """What vLLM (0.33, docs/export.md) cannot load: the parts of a fused q/k/v or gate/up layer with different
    schemes, or quantized and not, and asymmetric parts whose packed zero points do not split at a word."""
    by_name = {w.name: w for w in weights}
    mixed: list[str] = []
    unsplittable: list[str] = []
    parents = {name.rsplit(".", 1)[0] for name in by_name}
    for parent in sorted(parents):
        for fused in FUSED_SETS:
            parts = [by_name.get(f"{parent}.{leaf}") for leaf in fused]
            present = [p for p in parts if p is not None]
            if not present:
                continue
            if len(present) < len(parts) or len({_scheme_key(p, settings) for p in present}) > 1:
                mixed += [p.name for p in present]
            elif not present[0].spec.sym and any(p.out_features * exported_bits(p.spec.bits, settings) % 32
                                                 for p in present):
                unsplittable += [p.name for p in present]
    problems = []
    if mixed:
        problems.append(Problem(
            "vLLM fuses q/k/v and gate/up into one layer with one scheme, and these parts differ",
            "Compress again with one spec per fused set (--granularity layer or fused, no --plan overrides that "
            "split one).", tuple(mixed)))
    if unsplittable:
        problems.append(Problem(
            "vLLM splits a fused layer's packed zero points at whole words, and these outputs times bits are not "
            "a multiple of 32", "Compress again with symmetric options (bits:group:method:sym).", tuple(unsplittable)))
    return problems


def quantization_config(weights: list[ExportedWeight],
                        settings: ExportSettings = DEFAULT_SETTINGS) -> dict[str, Any]:
    """``quantization_config`` for config.json: one config group per distinct scheme, exact targets."""
    groups: dict[tuple[int, str, int | None, bool], list[str]] = defaultdict(list)
    for w in weights:
        groups[_scheme_key(w, settings)].append(w.name)
    config_groups = {}
    for i, ((bits, strategy, group_size, sym), names) in enumerate(sorted(groups.items(), key=str)):
        config_groups[f"group_{i}"] = {
            "targets": names,
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": strategy,
                        "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"
    title = "compressed-tensors (pack-quantized)"
    advice = "Load it with layerwise.load, or compress again without ties, sub-layer drops or nf4/int8 methods."

    def check(self, ckpt: Checkpoint, settings: ExportSettings) -> list[Problem]:
        weights = quantized_weights(ckpt.model)
        problems = non_linear_reasons(ckpt, weights) + gguf_problems(ckpt.model)
        if problems:  # nothing else matters for modules no loader quantizes
            return problems
        problems = ragged_problems(weights)
        if settings.target == "vllm":
            problems += vllm_problems(weights, settings)
        return problems

    def write(self, ckpt: Checkpoint, out: Path, settings: ExportSettings) -> None:
        weights = quantized_weights(ckpt.model)
        tensors = dense_state(ckpt.model)
        for w in weights:
            tensors.update(module_tensors(w, settings))
        write_model_files(ckpt, out, tensors, quantization_config(weights, settings))


EXPORTERS.register(CompressedTensorsExporter.name)(CompressedTensorsExporter())
