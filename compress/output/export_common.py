"""What every export format shares: the exporter interface, the registry, and the quantized modules as
plain integer codes, scales and zero points.

A format is one `Exporter` subclass in its own module, registered by name in `EXPORTERS`. It answers two
questions before anything is written -- which plan entries it cannot hold (`blockers`, from
layerwise.json alone) and which modules of the loaded model it cannot hold (`check`) -- and then writes
into a fresh directory (`write`); `layerwise.output.export.export_checkpoint` does the rest (output checks,
loading, the atomic rename).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from layerwise.core.bitstream import unpack
from layerwise.core.errors import LayerwiseError
from layerwise.core.registry import Registry
from layerwise.core.types import BNB_BITS, Plan, QuantSpec
from layerwise.output.checkpoint import WEIGHTS_FILE, Checkpoint, unique_state_dict
from layerwise.quant import QuantLinear


@dataclass(frozen=True)
class ExportedWeight:
    """One quantized linear as integers: ``w[n, k] = (codes[n, k] - zeros[n, g]) * scales[n, g]``.

    `codes` are the unsigned codes (N, K) in ``[0, 2**bits)``; `zeros` the integer zero points (N, G),
    ``2**(bits-1)`` everywhere when symmetric; `scales` the stored fp16 scales widened to float32
    (exact); ``g = k // width``, where `width` is the group size, or K when the row is one group.
    """

    name: str
    spec: QuantSpec
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def width(self) -> int:
        """Input columns per group (the last group may be shorter)."""
        return self.spec.group_size if self.n_groups > 1 else self.in_features


def exported_weight(name: str, module: QuantLinear) -> ExportedWeight:
    spec = module.spec
    codes = unpack(module.qweight, spec.bits, module.in_features).to(torch.int64)
    if spec.sym:
        zeros = torch.full(tuple(module.scales.shape), 2 ** (spec.bits - 1), dtype=torch.int64)
    else:
        assert module.zeros is not None
        zeros = module.zeros.to(torch.int64)  # integers in [0, 2**bits) stored as fp16: exact
    return ExportedWeight(name, spec, codes, module.scales.to(torch.float32), zeros,
                          None if module.bias is None else module.bias.detach())


def quantized_weights(model: nn.Module) -> list[ExportedWeight]:
    """Every QuantLinear of `model` (full module names), in module order."""
    return [exported_weight(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]


def model_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype the checkpoint's model computes in (its float tensors and dequantized weights)."""
    return getattr(torch, ckpt.meta.get("dtype", "float32"))


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors that are not part of a QuantLinear, each shared tensor once (first name)."""
    quantized = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, QuantLinear))
    return unique_state_dict(model, exclude=quantized)


def structure_blockers(plan: Plan) -> list[str]:
    """Tied layers and dropped sub-layers: no loader but layerwise rebuilds them."""
    reasons = []
    tied = [a.layer for a in plan.layers if a.action == "tie"]
    dropped = [a.layer for a in plan.layers if a.drop]
    if tied:
        reasons.append(f"layers {tied} are tied to other layers (shared weights)")
    if dropped:
        reasons.append(f"layers {dropped} have dropped sub-layers")
    return reasons


def bnb_blockers(plan: Plan) -> list[str]:
    """Modules quantized with a bitsandbytes method (nf4, int8): their codebooks and absmax scales are not
    an integer grid with a scale and zero point, so no grid format holds them exactly."""
    found = []
    for action in plan.layers:
        specs = [] if action.action != "quantize" else [action.spec()]
        specs += list(action.overrides.values())
        methods = sorted({s.method for s in specs if s is not None and s.method in BNB_BITS})
        if methods:
            found.append(f"layer {action.layer} ({', '.join(methods)})")
    return [f"{', '.join(found)} use bitsandbytes formats"] if found else []


def non_linear_reasons(ckpt: Checkpoint, weights: list[ExportedWeight]) -> list[str]:
    """Why some quantized modules cannot be exported: those that are not `nn.Linear` in the architecture as
    transformers builds it (GPT-2's Conv1D, for instance), since loaders only quantize nn.Linear modules."""
    with init_empty_weights():
        fresh = AutoModelForCausalLM.from_config(ckpt.model.config)
    modules = dict(fresh.named_modules())
    not_linear = [w.name for w in weights if not isinstance(modules.get(w.name), nn.Linear)]
    if not not_linear:
        return []
    return [f"modules {not_linear} are not nn.Linear in transformers, and only Linear is quantized"]


def write_model_files(ckpt: Checkpoint, out: Path, tensors: dict[str, torch.Tensor],
                      quantization_config: dict[str, Any] | None = None,
                      extra_json: dict[str, Any] | None = None) -> None:
    """config.json (with `quantization_config` when given), model.safetensors, tokenizer, extra JSON files."""
    ckpt.model.config.save_pretrained(out)
    if quantization_config is not None:
        config_path = out / "config.json"
        config = json.loads(config_path.read_text())
        config["quantization_config"] = quantization_config
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, out / WEIGHTS_FILE,
                                metadata={"format": "pt"})
    if ckpt.tokenizer is not None:
        ckpt.tokenizer.save_pretrained(out)
    for file, content in (extra_json or {}).items():
        (out / file).write_text(json.dumps(content, indent=2) + "\n")


class Exporter(ABC):
    """One output format: what it refuses and how it writes."""

    name: str
    title: str  # for messages: "a plain Hugging Face model", ...
    advice: str  # what the user can do instead when it refuses

    def blockers(self, plan: Plan) -> list[str]:
        """Why the plan's model cannot be written in this format (empty: it can)."""
        return structure_blockers(plan) + bnb_blockers(plan)

    def check(self, ckpt: Checkpoint) -> list[str]:
        """Modules of the loaded model this format cannot hold exactly (empty: all fit)."""
        return []

    @abstractmethod
    def write(self, ckpt: Checkpoint, out: Path) -> None:
        """Write the exported model into the empty directory `out`."""


EXPORTERS: Registry[Exporter] = Registry("export format")


def refuse(path: Path | str, exporter: Exporter, reasons: list[str]) -> LayerwiseError:
    return LayerwiseError(
        f"checkpoint {path} cannot be exported as {exporter.title}: {'; '.join(reasons)}. {exporter.advice}"
    )
