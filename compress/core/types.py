"""Plain data types that cross module borders: scores, quantization specs, per-layer actions, plans.

All of them are dataclasses that validate themselves on construction and round-trip through JSON
(`to_dict` / `from_dict`), so a user can read and edit every file layerwise writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from layerwise.core.errors import LayerwiseError, write_error
from layerwise.core.gguf_types import FALLBACKS, GGUF_TYPES, fitted_gguf_type, gguf_type

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_BITS = 16  # scales are stored as fp16 (asymmetric zero points at the code width, packed)
# The bitsandbytes formats (layerwise.quant.bnb) fix their code width and keep fp32 absmax scales.
BNB_BITS = {"nf4": 4, "int8": 8}
BNB_SCALE_BITS = 32
# NF4 block sizes bitsandbytes takes for 4-bit; 32 is left out: its CUDA kernels accept it only since early 2026.
NF4_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
# How a group's scale and zero are chosen (layerwise.quant.grid): from the group's range, or by a search
# that minimises the group's (Hessian-diagonal weighted) squared quantization error. The default is first.
GRIDS = ("minmax", "mse")
DEFAULT_GRID = GRIDS[0]
ACTIONS = ("keep", "quantize", "prune", "tie")
SUBLAYERS = ("attn", "mlp")  # the two sub-layers of a decoder layer that can be dropped on their own
# Names of the attention and MLP modules inside a decoder layer, across the supported layouts
# (OPT has no MLP module: fc1 and fc2 sit in the layer itself).
ATTENTION_NAMES = ("self_attn", "attn")
MLP_MODULE_NAMES = ("mlp", "fc1", "fc2")

# (out_features, in_features) of each linear module in one decoder layer, keyed by its name in the layer.
LinearShapes = dict[str, tuple[int, int]]
# What one measured damage (and one planned option) covers: a whole decoder layer, each linear module on its
# own, or each module with vLLM's fused sets (FUSED_SETS) taken together, as vLLM needs one scheme per set.
GRANULARITIES = ("layer", "module", "fused")
# Modules vLLM fuses into one layer (one scheme for all parts): attention's q/k/v and the MLP's gate/up.
FUSED_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one linear: `bits`-bit codes in groups of `group_size` input columns.

    Asymmetric (default): w ~ (q - zero) * scale with a fp16 scale and a `bits`-bit integer zero per
    group. Symmetric: the zero is fixed at 2**(bits-1) and not stored. A module is quantized with
    `fit(in_features)`, whose group size divides its width; the spec as written may still leave a last,
    shorter group (checkpoints of format version 1 have them), which then gets its own scale and zero.

    The bitsandbytes methods are absmax formats with no zero, so `sym` does not apply to them:
    ``nf4`` needs bits 4 and takes `group_size` as the bnb block size (one of `NF4_BLOCKSIZES`);
    ``int8`` needs bits 8 and scales whole rows, ignoring `group_size`.

    `grid` names how each group's scale and zero are chosen (`GRIDS`): ``minmax`` from the group's range,
    ``mse`` by the error-minimising search of `layerwise.quant.grid`. It changes which values are stored,
    not the format, so a checkpoint reads the same whatever its grid.
    """

    bits: int
    group_size: int = 128
    method: str = "rtn"
    sym: bool = False
    grid: str = DEFAULT_GRID
    gguf: str | None = None

    def __post_init__(self) -> None:
        if self.gguf is not None:
            self._check_gguf()
            return
        if self.bits not in SUPPORTED_BITS:
            raise LayerwiseError(
                f"unsupported bit width {self.bits}; choose one of {', '.join(map(str, SUPPORTED_BITS))}"
            )
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise LayerwiseError(f"group size must be a positive integer, got {self.group_size!r}")
        check_grid(self.grid)
        self._check_bnb()

    def _check_gguf(self) -> None:
        """A GGUF type fixes the code width and the block; it has its own scales, so sym and grid do not apply."""
        kind = gguf_type(self.gguf)  # type: ignore[arg-type]
        if (self.bits, self.group_size, self.sym, self.grid) != (kind.bits, kind.block, False, DEFAULT_GRID):
            raise LayerwiseError(
                f"GGUF type {kind.name} stores {kind.bits}-bit codes in blocks of {kind.block}; write the option as "
                f"{kind.name}[:method], without bits, group size, sym or grid")
        if self.method in BNB_BITS:
            raise LayerwiseError(f"GGUF type {kind.name} is quantized by rtn, gptq or gptaq, not {self.method!r}")

    @classmethod
    def of_gguf(cls, name: str, method: str = "rtn") -> QuantSpec:
        """The spec of GGUF type `name` (``q4_k``, ``q6_k``, ``q4_0``, ...) quantized by `method`."""
        kind = gguf_type(name)
        return cls(kind.bits, kind.block, method, gguf=kind.name)

    def _check_bnb(self) -> None:
        """The bitsandbytes methods have one code width each, and NF4 only the block sizes bnb takes."""
        if self.method not in BNB_BITS:
            return
        if self.bits != BNB_BITS[self.method]:
            raise LayerwiseError(
                f"method {self.method!r} stores {BNB_BITS[self.method]}-bit codes; set bits to "
                f"{BNB_BITS[self.method]}, not {self.bits}"
            )
        if self.method == "nf4" and self.group_size not in NF4_BLOCKSIZES:
            raise LayerwiseError(
                f"nf4 group size {self.group_size} is not a bitsandbytes block size; choose one of "
                f"{', '.join(map(str, NF4_BLOCKSIZES))}"
            )
        if self.grid != DEFAULT_GRID:
            raise LayerwiseError(
                f"method {self.method!r} keeps bitsandbytes' absmax scales, so grid {self.grid!r} does not apply; "
                f"use grid {DEFAULT_GRID!r} or method rtn / gptq"
            )

    def n_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_size)

    def fit(self, in_features: int) -> QuantSpec:
        """This spec with the group size a module of `in_features` inputs really gets (`fitted_group_size`).

        Serving formats (compressed-tensors, GGUF) and their kernels need groups that tile the row, so
        every module is quantized with a group size that divides its input width. The bitsandbytes
        methods keep theirs: nf4 blocks run over the flattened weight and int8 scales whole rows.
        """
        if self.method in BNB_BITS:
            return self
        if self.gguf is not None:
            fitted = fitted_gguf_type(self.gguf, in_features)
            if fitted is None:
                block = GGUF_TYPES[self.gguf].block
                raise LayerwiseError(
                    f"GGUF type {self.gguf} needs rows of whole {block}-weight blocks and {in_features}-wide inputs "
                    f"are not{' (nor of its fallback)' if self.gguf in FALLBACKS else ''}; choose a type whose "
                    "block divides the width, or an integer option such as 4:128")
            return QuantSpec.of_gguf(fitted, self.method)
        return replace(self, group_size=fitted_group_size(self.group_size, in_features))

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Bits one (out_features x in_features) weight takes when packed, overhead included.

        RTN / GPTQ: codes are a per-row bitstream padded to whole 32-bit words; each group adds a fp16
        scale and, when asymmetric, a `bits`-bit zero point, packed densely down each group's column
        (`layerwise.core.bitstream.pack_zeros`: ceil(out_features * bits / 32) words per group).
        nf4: 4 bits per weight (two codes a byte over the flattened weight, so an odd count pads half a
        byte) plus one fp32 absmax per block of `group_size` consecutive weights of the flattened
        (row-major) matrix -- bitsandbytes' blocks run across row ends. No double quantization.
        int8: 8 bits per weight plus one fp32 absmax per row; `group_size` plays no part.
        """
        if self.method == "nf4":
            n = out_features * in_features
            return 8 * math.ceil(n / 2) + BNB_SCALE_BITS * math.ceil(n / self.group_size)
        if self.method == "int8":
            return out_features * (8 * in_features + BNB_SCALE_BITS)
        if self.gguf is not None:  # whole blocks, scales and mins included (a partial block counted whole)
            kind = GGUF_TYPES[self.gguf]
            return out_features * math.ceil(in_features / kind.block) * kind.nbytes * 8
        words_per_row = math.ceil(in_features * self.bits / 32)
        zero_words = 0 if self.sym else math.ceil(out_features * self.bits / 32)
        groups = self.n_groups(in_features)
        return out_features * (words_per_row * 32 + groups * SCALE_BITS) + zero_words * 32 * groups

    def label(self) -> str:
        if self.gguf is not None:
            return f"{self.method}-{self.gguf}"
        grid = "" if self.grid == DEFAULT_GRID else f"-{self.grid}"
        return f"{self.method}-{self.bits}b-g{self.group_size}{'-sym' if self.sym else ''}{grid}"

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON; `grid` only when not the default, so files written before it existed still match."""
        data = asdict(self)
        if self.grid == DEFAULT_GRID:
            del data["grid"]
        if self.gguf is None:
            del data["gguf"]
        return data

    def option(self) -> str:
        """The `--options` spelling: ``bits:group_size:method`` plus ``:sym`` when symmetric; ``q4_k:method``."""
        if self.gguf is not None:
            return f"{self.gguf}:{self.method}"
        return f"{self.bits}:{self.group_size}:{self.method}{':sym' if self.sym else ''}"

    @classmethod
    def parse_option(cls, text: str, default_method: str = "rtn", default_group_size: int = 128) -> QuantSpec:
        """Read ``bits[:group_size[:method[:sym]]]``, e.g. ``3:128``, ``4:64:gptq``, ``4:128:rtn:sym``, or a GGUF
        type ``name[:method]``, e.g. ``q4_k``, ``q6_k:gptq``."""
        parts = [p.strip() for p in text.strip().split(":")]
        if parts[0].lower() in GGUF_TYPES:
            if len(parts) > 2:
                raise LayerwiseError(f"cannot read option {text!r}; a GGUF type takes only a method, e.g. q4_k:gptq")
            return cls.of_gguf(parts[0].lower(), parts[1] if len(parts) > 1 and parts[1] else default_method)
        try:
            bits = int(parts[0])
            group_size = int(parts[1]) if len(parts) > 1 and parts[1] else default_group_size
        except ValueError:
            raise LayerwiseError(
                f"cannot read option {text!r}; write bits:group_size[:method[:sym]], e.g. 3:128 or 4:64:gptq, or a "
                f"GGUF type ({', '.join(GGUF_TYPES)})"
            ) from None
        method = parts[2] if len(parts) > 2 and parts[2] else default_method
        sym = len(parts) > 3 and parts[3] == "sym"
        if len(parts) > 4 or (len(parts) > 3 and parts[3] not in ("sym", "asym")):
            raise LayerwiseError(f"cannot read option {text!r}; the fourth field may only be sym or asym")
        return cls(bits, group_size, method, sym)


# Group sizes tried, largest first, when an option's group does not divide a module's input width: powers
# of two, which every serving kernel takes (vLLM's Marlin: 32/64/128; llama.cpp's legacy blocks: 32).
_FALLBACK_GROUPS = (512, 256, 128, 64, 32)


def fitted_group_size(group_size: int, in_features: int) -> int:
    """The group size a module of `in_features` inputs is quantized with when `group_size` is asked for.

    `group_size` itself when it divides the width or covers the whole row (one group per row); else the
    largest of 512/256/128/64/32 below it that divides the width ("128 -> 64 for 576-wide inputs"); else
    one group per row (per-channel). No group is ever shorter than the others, so every format can hold it.
    """
    if group_size >= in_features or in_features % group_size == 0:
        return group_size
    for candidate in _FALLBACK_GROUPS:
        if candidate < group_size and in_features % candidate == 0:
            return candidate
    return in_features


def check_grid(grid: object) -> None:
    """Refuse a grid name that is not one of `GRIDS`, in one line naming them."""
    if grid not in GRIDS:
        raise LayerwiseError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")


def sublayer_of(module_name: str) -> str | None:
    """``attn`` or ``mlp`` for a module named inside a decoder layer (``self_attn.q_proj``), else None."""
    head = module_name.split(".", 1)[0]
    if head in ATTENTION_NAMES:
        return "attn"
    if head in MLP_MODULE_NAMES:
        return "mlp"
    return None


def check_granularity(granularity: object) -> None:
    """Refuse a granularity that is not one of `GRANULARITIES`, in one line naming them."""
    if granularity not in GRANULARITIES:
        raise LayerwiseError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")


def module_units(names: list[str], granularity: str) -> list[tuple[str, ...]]:
    """The linear modules of one decoder layer (`names`), grouped into the units that get one option each.

    ``layer``: one unit of all of them. ``module``: one unit per module. ``fused``: one per module, except
    that the parts of a fused set under one parent (``self_attn.q_proj``/``k_proj``/``v_proj``) form one unit.
    Units keep the order of `names`, each at the place of its first module.
    """
    check_granularity(granularity)
    if granularity == "layer":
        return [tuple(names)]
    units: dict[str, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        fused = next((s for s in FUSED_SETS if leaf in s), None) if granularity == "fused" else None
        key = f"{parent}.{fused[0]}" if fused is not None else name
        units.setdefault(key, []).append(name)
    return [tuple(unit) for unit in units.values()]


def unit_name(unit: tuple[str, ...]) -> str:
    """How a unit of `module_units` is keyed in `LayerScores.module_damage`: its modules joined by ``+``."""
    return "+".join(unit)


def parse_options(text: str | list[str], default_method: str = "rtn", default_group_size: int = 128) -> list[QuantSpec]:
    """A comma-separated option list (or a list of option strings) as QuantSpecs, duplicates removed."""
    items = text.split(",") if isinstance(text, str) else list(text)
    specs = [QuantSpec.parse_option(t, default_method, default_group_size) for t in items if t.strip()]
    if not specs:
        raise LayerwiseError("the option list is empty; give e.g. --options 2:128,3:128,4:128,8:128")
    return list(dict.fromkeys(specs))


@dataclass
class LayerAction:
    """What to do with one decoder layer.

    `action` is `keep` (full precision), `quantize` (then `bits`, `group_size`, `method`, `sym` apply;
    `method=None` means "whatever `apply` is told"), `prune` or `tie` (to layer `tie_to`).
    `overrides` maps a module name inside the layer (e.g. ``mlp.down_proj``) to its own spec.
    `drop` names sub-layers (``attn``, ``mlp``) removed from a kept or quantized layer: the layer then
    adds nothing from them to the residual stream. Dropping both is `prune`.
    `grid` (`GRIDS`) is how the quantize action's groups get their scales; None, like `method=None`, means
    "whatever `apply` is told". Overrides are whole specs and keep their own grid.
    """

    layer: int
    action: str = "quantize"
    bits: int | None = None
    group_size: int | None = None
    method: str | None = None
    sym: bool = False
    tie_to: int | None = None
    overrides: dict[str, QuantSpec] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)
    grid: str | None = None
    gguf: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise LayerwiseError(
                f"layer {self.layer}: unknown action {self.action!r}; choose one of {', '.join(ACTIONS)}"
            )
        if self.grid is not None:
            check_grid(self.grid)
            if self.action != "quantize":
                raise LayerwiseError(f"layer {self.layer}: a {self.action} action quantizes nothing; drop its grid")
        self._check_drop()
        if self.action == "quantize":
            if self.bits is None or self.group_size is None:
                raise LayerwiseError(f"layer {self.layer}: a quantize action needs bits and group_size")
            self.spec()  # validates bits and group size
        if self.action == "tie" and self.tie_to is None:
            raise LayerwiseError(f"layer {self.layer}: a tie action needs tie_to")
        if self.action == "tie" and self.tie_to == self.layer:
            raise LayerwiseError(f"layer {self.layer}: a layer cannot be tied to itself")

    def _check_drop(self) -> None:
        unknown = sorted(set(self.drop) - set(SUBLAYERS))
        if unknown:
            raise LayerwiseError(
                f"layer {self.layer}: cannot drop {unknown}; the sub-layers are {', '.join(SUBLAYERS)}"
            )
        self.drop = [s for s in SUBLAYERS if s in self.drop]
        if self.drop and self.action not in ("keep", "quantize"):
            raise LayerwiseError(f"layer {self.layer}: a {self.action} action cannot also drop sub-layers")
        if len(self.drop) == len(SUBLAYERS):
            raise LayerwiseError(f"layer {self.layer}: dropping both attn and mlp removes the layer; use prune")

    @property
    def removed(self) -> bool:
        """True when the layer's own weights are gone from the compressed model (pruned or tied)."""
        return self.action in ("prune", "tie")

    def spec(self, default_method: str = "rtn", default_grid: str = DEFAULT_GRID) -> QuantSpec | None:
        if self.action != "quantize":
            return None
        assert self.bits is not None and self.group_size is not None
        if self.gguf is not None:
            return QuantSpec.of_gguf(self.gguf, self.method or default_method)
        return QuantSpec(self.bits, self.group_size, self.method or default_method, self.sym,
                         self.grid or default_grid)

    @classmethod
    def quantized(cls, layer: int, spec: QuantSpec) -> LayerAction:
        """A quantize action with `spec` (its grid left to `apply` when it is the default)."""
        return cls(layer, "quantize", spec.bits, spec.group_size, spec.method, spec.sym,
                   grid=None if spec.grid == DEFAULT_GRID else spec.grid, gguf=spec.gguf)

    def module_spec(
        self, module: str, default_method: str = "rtn", default_grid: str = DEFAULT_GRID
    ) -> QuantSpec | None:
        if module in self.overrides:
            return self.overrides[module]
        return self.spec(default_method, default_grid)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "action": self.action}
        if self.action == "quantize":
            out.update(bits=self.bits, group_size=self.group_size, method=self.method, sym=self.sym)
            if self.grid is not None:  # absent unless set: plans written before grids existed read the same
                out["grid"] = self.grid
            if self.gguf is not None:
                out["gguf"] = self.gguf
        if self.action == "tie":
            out["tie_to"] = self.tie_to
        if self.overrides:
            out["overrides"] = {name: spec.to_dict() for name, spec in self.overrides.items()}
        if self.drop:
            out["drop"] = list(self.drop)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerAction:
        try:
            overrides = {k: QuantSpec(**v) for k, v in data.get("overrides", {}).items()}
            fields = {k: v for k, v in data.items() if k != "overrides"}
            return cls(**fields, overrides=overrides)
        except TypeError as exc:
            raise LayerwiseError(f"malformed layer action {data!r}: {exc}") from None


@dataclass
class LayerScores:
    """One importance value per decoder layer; higher always means more important.

    `linear_shapes` records each layer's linear shapes so that a plan can be budgeted from the scores
    file alone, without loading the model again.
    """

    scorer: str
    scores: list[float]
    linear_shapes: list[LinearShapes]
    model: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    module_scores: dict[str, list[float]] = field(default_factory=dict)
    # Measured damage of quantizing each layer alone with each option (key: QuantSpec.option()), when the
    # scorer measures it; the `optimal` planner chooses among these options.
    option_damage: dict[str, list[float]] = field(default_factory=dict)
    # Angular distance between the hidden states entering layer l and layer l + n, keyed by str(n), one
    # value per start layer l (the `angular` scorer); the block of n layers with the smallest is pruned.
    block_distance: dict[str, list[float]] = field(default_factory=dict)
    # Measured damage of running layer j with the weights of layer j - d (tying j to j - d), keyed by
    # str(d), one value per layer j (NaN where j - d < 0); the tie planner reads it.
    tie_damage: dict[str, list[float]] = field(default_factory=dict)
    # Per layer, the measured damage of quantizing one unit of its modules alone (`module_units` at a
    # granularity finer than the layer; key: `unit_name`) with each option (key: QuantSpec.option()), when the
    # scorer measured it; the `optimal` planner then chooses an option per unit. Empty when not measured.
    module_damage: list[dict[str, dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0
    version: int = 1

    def __post_init__(self) -> None:
        if len(self.scores) != len(self.linear_shapes):
            raise LayerwiseError(
                f"scores has {len(self.scores)} layers but linear_shapes has {len(self.linear_shapes)}"
            )
        self.linear_shapes = [{k: (int(v[0]), int(v[1])) for k, v in s.items()} for s in self.linear_shapes]
        if self.module_damage and len(self.module_damage) != len(self.scores):
            raise LayerwiseError(
                f"scores has {len(self.scores)} layers but module_damage has {len(self.module_damage)}")

    @property
    def n_layers(self) -> int:
        return len(self.scores)

    def ranking(self) -> list[int]:
        """Layer indices, most important first (ties broken by layer index)."""
        return sorted(range(self.n_layers), key=lambda i: (-self.scores[i], i))

    def subset(self, layers: list[int], linear_shapes: list[LinearShapes] | None = None) -> LayerScores:
        """The per-layer values of `layers` only (in that order), e.g. the layers a pruned plan still
        quantizes; `linear_shapes` replaces theirs (sub-layers dropped since). Block and tie values,
        which relate layers to each other, are left out."""
        def pick(values: list[float]) -> list[float]:
            return [values[i] for i in layers]

        return LayerScores(
            scorer=self.scorer, scores=pick(self.scores),
            linear_shapes=linear_shapes if linear_shapes is not None else [self.linear_shapes[i] for i in layers],
            model=self.model, calibration=self.calibration,
            module_scores={k: pick(v) for k, v in self.module_scores.items()},
            option_damage={k: pick(v) for k, v in self.option_damage.items()},
            module_damage=pick(self.module_damage) if self.module_damage else [], seconds=self.seconds,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"format": "layerwise.scores", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerScores:
        data = {k: v for k, v in data.items() if k != "format"}
        try:
            return cls(**data)
        except TypeError as exc:
            raise LayerwiseError(f"malformed scores: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LayerScores:
        return cls.from_dict(read_json(path, "scores"))


@dataclass
class Plan:
    """Per-layer actions plus the budget they meet and how they were made."""

    layers: list[LayerAction]
    target_bits: float | None = None
    avg_bits: float | None = None
    made_by: dict[str, Any] = field(default_factory=dict)
    version: int = 1

    def __post_init__(self) -> None:
        for i, action in enumerate(self.layers):
            if action.layer != i:
                raise LayerwiseError(
                    f"plan entry {i} is for layer {action.layer}; entries must list layers 0..N-1 in order"
                )
        self._check_structure()

    def _check_structure(self) -> None:
        """Ties point at layers that exist and compute; some layer stays; some attention stays."""
        if self.layers and all(a.action == "prune" for a in self.layers):
            raise LayerwiseError("the plan prunes every layer; at least one must stay")
        for a in self.layers:
            if a.action != "tie":
                continue
            assert a.tie_to is not None
            if not 0 <= a.tie_to < self.n_layers:
                raise LayerwiseError(
                    f"layer {a.layer} is tied to layer {a.tie_to}, which does not exist (the plan has "
                    f"{self.n_layers} layers)"
                )
            target = self.layers[a.tie_to]
            if target.removed or target.drop:
                what = f"{target.action}d" if target.removed else f"has its {' and '.join(target.drop)} dropped"
                raise LayerwiseError(
                    f"layer {a.layer} is tied to layer {a.tie_to}, which is {what}; tie to a layer that keeps "
                    "all its weights"
                )
        # A tied layer has no drops of its own and ties only to a layer without drops: it keeps attention.
        if not any(a.action != "prune" and "attn" not in a.drop for a in self.layers):
            raise LayerwiseError("the plan drops the attention of every layer; at least one must keep it")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def structural(self) -> bool:
        """Whether the plan prunes, ties or drops anything (the model's structure changes)."""
        return any(a.removed or a.drop for a in self.layers)

    def kept_layers(self) -> list[int]:
        """Original indices of the layers that remain in the model (not pruned), in order."""
        return [a.layer for a in self.layers if a.action != "prune"]

    def compact(self) -> Plan:
        """The plan for the model after pruning: kept layers renumbered 0..K-1, tie targets remapped."""
        index = {old: new for new, old in enumerate(self.kept_layers())}
        layers = [
            replace(a, layer=index[a.layer], tie_to=None if a.tie_to is None else index[a.tie_to],
                    overrides=dict(a.overrides), drop=list(a.drop))
            for a in self.layers if a.action != "prune"
        ]
        return replace(self, layers=layers)

    def expand(self, compacted: Plan) -> Plan:
        """Inverse of `compact`: this plan with its kept layers' actions taken from `compacted`."""
        kept = self.kept_layers()
        if compacted.n_layers != len(kept):
            raise LayerwiseError(f"a plan of {compacted.n_layers} layers cannot fill the {len(kept)} kept layers")
        by_layer = {
            kept[a.layer]: replace(a, layer=kept[a.layer], tie_to=None if a.tie_to is None else kept[a.tie_to])
            for a in compacted.layers
        }
        return replace(self, layers=[by_layer.get(a.layer, a) for a in self.layers])

    def bits_per_layer(self) -> list[int | None]:
        return [a.bits if a.action == "quantize" else None for a in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "layerwise.plan",
            "version": self.version,
            "target_bits": self.target_bits,
            "avg_bits": self.avg_bits,
            "made_by": self.made_by,
            "layers": [a.to_dict() for a in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if data.get("format", "layerwise.plan") != "layerwise.plan":
            raise LayerwiseError(f"not a layerwise plan (format {data.get('format')!r})")
        if data.get("version", 1) != 1:
            raise LayerwiseError(f"plan format version {data.get('version')} is unknown; this layerwise reads 1")
        if not isinstance(data.get("layers"), list):
            raise LayerwiseError("plan has no 'layers' list")
        return cls(
            layers=[LayerAction.from_dict(a) for a in data["layers"]],
            target_bits=data.get("target_bits"),
            avg_bits=data.get("avg_bits"),
            made_by=data.get("made_by", {}),
        )

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        return cls.from_dict(read_json(path, "plan"))


@dataclass
class LayerOutcome:
    """What applying one layer's action did: the spec of every module and its relative weight error."""

    layer: int
    specs: dict[str, QuantSpec | None] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    sq_norms: dict[str, float] = field(default_factory=dict)  # ||W||_F^2 of each quantized module

    def layer_error(self) -> float | None:
        """Relative error of the layer's quantized linears taken together: ||W - Q(W)||_F / ||W||_F."""
        total = sum(self.sq_norms.values())
        if not total:
            return None
        return (sum(self.errors[n] ** 2 * self.sq_norms[n] for n in self.errors) / total) ** 0.5


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LayerwiseError(f"{what} file {path} does not exist; check the path")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LayerwiseError(f"{what} file {path} is not valid JSON ({exc}); regenerate it") from None
    if not isinstance(data, dict):
        raise LayerwiseError(f"{what} file {path} must hold a JSON object")
    return data


def write_json_atomic(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write JSON to a temporary sibling, then rename: a crash never leaves half a file."""
    write_file_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """`write` a temporary sibling of `path`, then rename it into place: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a full or read-only filesystem: say so in one line
        error = write_error(path, exc)
        if error is None:
            raise
        raise error from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
