"""``compressed-tensors`` export: the ``pack-quantized`` format vLLM and transformers read.

Facts this relies on (compressed-tensors 0.20, `PackedQuantizationCompressor` and `_dequantize`):

* A module's stored codes are signed, ``x_q in [-2**(b-1), 2**(b-1))``, and its weight is
  ``(x_q - zero_point) * scale`` computed in the scale's dtype (the model's dtype), with
  ``zero_point = 0`` when the scheme is symmetric (and then not stored).
* ``weight_packed`` (int32, (N, ceil(K*b/32))) holds ``x_q + 2**(b-1)`` as a dense little-endian
  bitstream per row -- element k at stream bits ``[k*b, (k+1)*b)`` -- which is layerwise's own
  ``bitstream-v1`` layout bit for bit. ``weight_zero_point`` (asymmetric only) is packed the same way
  along the output dimension: int32 of shape (ceil(N*b/32), G). ``weight_scale`` is (N, G);
  ``weight_shape`` the int64 pair (N, K).
* Strategy ``group`` needs K to be a multiple of the group size (a shorter last group is refused
  by its loader); a row that is a single group is written as strategy ``channel``.

Our weight is ``(q - z) * s`` with unsigned codes q, so the mapping is ``x_q = q - 2**(b-1)`` and
``zero_point = z - 2**(b-1)``: our dequantized weight and theirs agree exactly when the model's
dtype holds the fp16 scales exactly (float32 and float16 checkpoints; bfloat16 rounds the scales).
Per-module bits become one config group per distinct (bits, strategy, group size, symmetry), whose
``targets`` are the exact module names.

3-bit modules are written on the 4-bit grid, exactly: asymmetric codes and zero point stay the same
unsigned numbers; symmetric codes move up by 4 (``q + 4 - 8 = q - 4``) so that the scheme stays
symmetric. They cost 4 bits per weight in the export. (The pack-quantized compressor also packs 3-bit
codes, but older readers, and vLLM's int kernels, take 4 and 8 bits only.) 2-bit modules are written as
2-bit pack-quantized: transformers loads them; vLLM's kernels do not take 2 bits.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from layerwise.core.bitstream import pack
from layerwise.output.checkpoint import Checkpoint
from layerwise.output.export_common import (
    EXPORTERS,
    ExportedWeight,
    Exporter,
    dense_state,
    model_dtype,
    non_linear_reasons,
    quantized_weights,
    write_model_files,
)

FORMAT = "pack-quantized"


def exported_bits(bits: int) -> int:
    """The code width a `bits`-bit module is written with (3-bit codes go on the 4-bit grid)."""
    return 4 if bits == 3 else bits


def _scheme_key(w: ExportedWeight) -> tuple[int, str, int | None, bool]:
    strategy = "channel" if w.n_groups == 1 else "group"
    return exported_bits(w.spec.bits), strategy, None if strategy == "channel" else w.spec.group_size, w.spec.sym


def _codes_and_zeros(w: ExportedWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Unsigned codes and zero points on the exported grid; the same weight ``(q - z) * s``."""
    bits = exported_bits(w.spec.bits)
    shift = 2 ** (bits - 1) - 2 ** (w.spec.bits - 1) if w.spec.sym else 0
    return w.codes + shift, w.zeros + shift, bits


def module_tensors(w: ExportedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for module `w.name` (full names)."""
    codes, zeros, bits = _codes_and_zeros(w)
    out = {
        f"{w.name}.weight_packed": pack(codes, bits),
        f"{w.name}.weight_scale": w.scales.to(dtype),
        f"{w.name}.weight_shape": torch.tensor([w.out_features, w.in_features], dtype=torch.int64),
    }
    if not w.spec.sym:
        out[f"{w.name}.weight_zero_point"] = pack(zeros.T.contiguous(), bits).T.contiguous()
    if w.bias is not None:
        out[f"{w.name}.bias"] = w.bias
    return out


def quantization_config(weights: list[ExportedWeight]) -> dict[str, Any]:
    """``quantization_config`` for config.json: one config group per distinct scheme, exact targets."""
    groups: dict[tuple[int, str, int | None, bool], list[str]] = defaultdict(list)
    for w in weights:
        groups[_scheme_key(w)].append(w.name)
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
    advice = "Load it with layerwise.load, or compress again without ties, sub-layer drops or nf4/int8 methods"

    def check(self, ckpt: Checkpoint) -> list[str]:
        weights = quantized_weights(ckpt.model)
        reasons = []
        ragged = [w.name for w in weights if w.n_groups > 1 and w.in_features % w.spec.group_size]
        if ragged:
            reasons.append(
                f"modules {ragged} have a last group shorter than the group size, which compressed-tensors' group "
                "strategy does not allow; compress again with a group size that divides their input width"
            )
        return reasons + non_linear_reasons(ckpt, weights)

    def write(self, ckpt: Checkpoint, out: Path) -> None:
        weights = quantized_weights(ckpt.model)
        dtype = model_dtype(ckpt)
        tensors = dense_state(ckpt.model)
        for w in weights:
            tensors.update(module_tensors(w, dtype))
        write_model_files(ckpt, out, tensors, quantization_config(weights))


EXPORTERS.register(CompressedTensorsExporter.name)(CompressedTensorsExporter())
