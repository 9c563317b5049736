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
import re
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from layerwise.core.bitstream import unpack, unpack_zeros
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
        zeros = unpack_zeros(module.zeros, spec.bits, module.out_features).to(torch.int64)
    return ExportedWeight(name, spec, codes, module.scales.to(torch.float32), zeros,
                          None if module.bias is None else module.bias.detach())


def quantized_weights(model: nn.Module) -> list[ExportedWeight]:
    """Every QuantLinear of `model` on layerwise's integer grid (full module names), in module order; modules
    stored as GGUF blocks are left out (`gguf_problems`)."""
    return [exported_weight(name, m) for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.gguf is None]


def gguf_problems(model: nn.Module) -> list[Problem]:
    """Modules quantized to a llama.cpp type: only the GGUF export holds their blocks."""
    names = tuple(name for name, m in model.named_modules() if isinstance(m, QuantLinear) and m.gguf is not None)
    if not names:
        return []
    return [Problem("quantized to llama.cpp types (GGUF blocks)", "Export it with --format gguf.", names)]


def model_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype the checkpoint's model computes in (its float tensors and dequantized weights)."""
    return getattr(torch, ckpt.meta.get("dtype", "float32"))


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors that are not part of a QuantLinear, each shared tensor once (first name)."""
    quantized = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, QuantLinear))
    return unique_state_dict(model, exclude=quantized)


_RECOMPRESS = "Load it with layerwise.load, or compress again without ties and sub-layer drops."


def structure_blockers(plan: Plan) -> list[Problem]:
    """Tied layers and dropped sub-layers: no loader but layerwise rebuilds them."""
    problems = []
    tied = tuple(a.layer for a in plan.layers if a.action == "tie")
    dropped = tuple(a.layer for a in plan.layers if a.drop)
    if tied:
        problems.append(Problem(f"{describe_layers(tied)} {_are(tied)} tied to other layers (shared weights)",
                                _RECOMPRESS))
    if dropped:
        problems.append(Problem(f"{describe_layers(dropped)} {_have(dropped)} dropped sub-layers", _RECOMPRESS))
    return problems


def bnb_blockers(plan: Plan) -> list[Problem]:
    """Modules quantized with a bitsandbytes method (nf4, int8): their codebooks and absmax scales are not
    an integer grid with a scale and zero point, so no grid format holds them exactly."""
    found = []
    for action in plan.layers:
        specs = [] if action.action != "quantize" else [action.spec()]
        specs += list(action.overrides.values())
        methods = sorted({s.method for s in specs if s is not None and s.method in BNB_BITS})
        if methods:
            found.append(f"layer {action.layer} ({', '.join(methods)})")
    if not found:
        return []
    return [Problem(f"{', '.join(found)} use bitsandbytes formats, which are not an integer grid",
                    "Compress again with method rtn, gptq or gptaq.")]


def non_linear_reasons(ckpt: Checkpoint, weights: list[ExportedWeight]) -> list[Problem]:
    """Why some quantized modules cannot be exported: those that are not `nn.Linear` in the architecture as
    transformers builds it (GPT-2's Conv1D, for instance), since loaders only quantize nn.Linear modules."""
    with init_empty_weights():
        fresh = AutoModelForCausalLM.from_config(ckpt.model.config)
    modules = dict(fresh.named_modules())
    not_linear = tuple(w.name for w in weights if not isinstance(modules.get(w.name), nn.Linear))
    if not not_linear:
        return []
    return [Problem("not nn.Linear in transformers, and loaders quantize only nn.Linear modules",
                    "Load it with layerwise.load: this architecture's quantized modules have no export.", not_linear)]


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


@dataclass(frozen=True)
class ExportSettings:
    """How to export: `three_bit_as_four` writes 3-bit modules on the 4-bit grid (compressed-tensors, for
    readers older than its dense packing); `target` names the engine whose rules the export must meet
    (``vllm``), None for the format's own rules only."""

    three_bit_as_four: bool = False
    target: str | None = None
    gguf_embeddings: str = "q8_0"  # GGUF: the type of the embedding (and of an untied head)


TARGETS = ("vllm",)


def check_target(target: str | None) -> str | None:
    """Refuse a serving target layerwise does not know, naming the ones it does."""
    if target is not None and target not in TARGETS:
        raise LayerwiseError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    return target


class Exporter(ABC):
    """One output format: what it refuses and how it writes."""

    name: str
    title: str  # for messages: "a plain Hugging Face model", ...
    advice: str  # what the user can do instead when it refuses
    single_file: bool = False  # writes one file (GGUF), not a directory

    def blockers(self, plan: Plan) -> list[Problem]:
        """Why the plan's model cannot be written in this format (empty: it can)."""
        return structure_blockers(plan) + bnb_blockers(plan)

    def check(self, ckpt: Checkpoint, settings: ExportSettings) -> list[Problem]:
        """Modules of the loaded model this format (and `settings.target`) cannot hold exactly (empty: all fit)."""
        return []

    @abstractmethod
    def write(self, ckpt: Checkpoint, out: Path, settings: ExportSettings) -> str | None:
        """Write the exported model into the empty directory `out` (the file `out`, `single_file`); returns
        what the user should know about it, if anything."""


EXPORTERS: Registry[Exporter] = Registry("export format")


@dataclass(frozen=True)
class Problem:
    """Why some modules cannot be exported: the reason, the fix that works, and the modules (full names)."""

    reason: str
    fix: str
    modules: tuple[str, ...] = ()

    def summary(self) -> str:
        where = f"{describe_modules(self.modules)}: " if self.modules else ""
        return f"{where}{self.reason}"


def describe_modules(names: tuple[str, ...] | list[str]) -> str:
    """Module names in a few words: ``q_proj, k_proj of layers 0-29`` rather than 60 full names.

    Names inside decoder layers (``model.layers.<i>.<path>``) are grouped by the layers they occur in; others
    are listed as they are.
    """
    layers_of: dict[str, list[int]] = defaultdict(list)
    others = []
    for name in names:
        found = _LAYER_NAME.match(name)
        if found:
            layers_of[found.group(2)].append(int(found.group(1)))
        else:
            others.append(name)
    # A module by its last name (q_proj) unless two paths in the layer share it (GPT-2's attn.c_proj, mlp.c_proj).
    leaves = [path.rsplit(".", 1)[-1] for path in layers_of]
    by_layers: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for (path, layers), leaf in zip(layers_of.items(), leaves, strict=True):
        by_layers[tuple(sorted(set(layers)))].append(leaf if leaves.count(leaf) == 1 else path)
    parts = [f"{', '.join(leaves)} of {describe_layers(layers)}" for layers, leaves in by_layers.items()]
    return "; ".join(parts + others)


# The first numeric component is the decoder layer: model.layers.3.self_attn.q_proj, transformer.h.3.attn.c_attn.
_LAYER_NAME = re.compile(r"^(?:.*?\.)?(\d+)\.(.+)$")


def _are(items: tuple[int, ...]) -> str:
    return "is" if len(items) == 1 else "are"


def _have(items: tuple[int, ...]) -> str:
    return "has" if len(items) == 1 else "have"


def describe_layers(layers: tuple[int, ...]) -> str:
    """``layer 3``, ``layers 0-29``, ``layers 0-3, 7, 9-11``."""
    spans: list[list[int]] = []
    for i in layers:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"layer{'s' if len(layers) > 1 else ''} {text}"


def refuse(path: Path | str, exporter: Exporter, problems: list[Problem]) -> LayerwiseError:
    """One line: what cannot be exported, summarised, and the fixes; every module name in `details`."""
    fixes = list(dict.fromkeys(p.fix for p in problems if p.fix))
    details = [f"{name}: {p.reason}" for p in problems for name in p.modules]
    more = " (--verbose lists every module)" if details else ""
    return LayerwiseError(
        f"checkpoint {path} cannot be exported as {exporter.title}: {'; '.join(p.summary() for p in problems)}. "
        f"{' '.join(fixes) or exporter.advice}{more}", details=details)
