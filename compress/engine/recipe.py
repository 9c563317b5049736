"""`Recipe`: everything a compression run depends on, frozen and serialisable.

One recipe drives one `layerwise.engine.pipeline.run`: what calibration text to read, what structure to remove,
which scorer and planner allocate the bits (with only the planner arguments the user gave), the method
and its options, the device and dtype. The same recipe gives the same checkpoint; a resumed run must have
the recipe it started with (`Recipe.compared` is what is compared).

`rotate` (``hadamard``, ``hadamard:r2``, ... see `layerwise.transform.config`) fuses orthogonal rotations into
the weights after the structural changes and before scoring; ``auto`` lets the pipeline choose once the model
is open (`layerwise.engine.pipeline.resolve_rotation`), and a recipe that has run holds what it chose. A
recipe without a rotation serialises exactly as before the option existed, so existing runs keep their
metadata and resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import DEFAULT_GRID, Plan, check_grid
from layerwise.data.corpora import DEFAULT_CALIB_LEN, DEFAULT_CALIB_WINDOWS
from layerwise.planning.structure import StructureConfig
from layerwise.transform import AUTO, RotationConfig

RECIPE_FORMAT = "layerwise.recipe"
RECIPE_VERSION = 1
DEFAULT_SCORER = "sensitivity"
DEFAULT_METHOD = "gptaq"
DEFAULT_GROUP_SIZE = 128
# Planner arguments a recipe may carry; each planner's Config says which of them it takes.
PLANNER_ARGS = ("high", "low", "group_size", "sym", "order", "seed", "n_low", "options", "granularity")
TOKEN_WINDOWS = "<token windows>"


@dataclass(frozen=True)
class Calibration:
    """Calibration text: a built-in corpus name or a text file (or token windows the caller passes to `run`)."""

    corpus: str = "wikipedia"
    windows: int = DEFAULT_CALIB_WINDOWS
    length: int = DEFAULT_CALIB_LEN


@dataclass(frozen=True)
class Recipe:
    """A compression run. `bits`/`uniform`/`n_low` set the budget; none of them and no structure is refused.

    `planner_args` holds only the planner arguments that were given (sorted name/value pairs), so a
    planner refuses what it does not take and fills the rest from its own defaults.
    """

    bits: float | None = None
    uniform: int | None = None
    scorer: str = DEFAULT_SCORER
    planner: str | None = None
    method: str = DEFAULT_METHOD
    planner_args: tuple[tuple[str, Any], ...] = ()
    structure: StructureConfig = field(default_factory=StructureConfig)
    prune_scorer: str | None = None
    calibration: Calibration = field(default_factory=Calibration)
    plan: Plan | None = None  # given (`layerwise apply`): no scoring or planning
    device: str = "auto"
    dtype: str | None = None  # None: the checkpoint's own on a GPU, float32 on the CPU
    grid: str = DEFAULT_GRID  # how groups get their scales, for actions that name no grid (like `method`)
    rotate: str | None = None  # fused rotations (`layerwise.transform`), e.g. "hadamard" or "auto"; None: none
    # Its own seed, not the planner's `seed` (that one orders lwq's random layer order, and planners that do
    # not take it refuse it).
    rotate_seed: int = 0
    target: str | None = None  # the engine the checkpoint is for: "gguf" (llama.cpp types) or "vllm"; None: any

    def __post_init__(self) -> None:
        check_grid(self.grid)
        unknown = [k for k, _ in self.planner_args if k not in PLANNER_ARGS]
        if unknown:
            raise LayerwiseError(f"unknown planner arguments {unknown}; a recipe takes {', '.join(PLANNER_ARGS)}")
        if self.rotate != AUTO:
            self.rotation  # noqa: B018 - refuses a malformed rotation on construction

    @property
    def rotation(self) -> RotationConfig | None:
        """The rotation to fuse; None for none. An ``auto`` request must be resolved by the pipeline first."""
        if self.rotate == AUTO:
            raise ValueError("rotate='auto' is decided once the model is open (pipeline.resolve_rotation)")
        return None if self.rotate is None else RotationConfig.parse(self.rotate, self.rotate_seed)

    @classmethod
    def build(cls, **kwargs: Any) -> Recipe:
        """A recipe from `compress()`-style keywords: planner arguments that are None count as not given."""
        given = {k: kwargs.pop(k) for k in PLANNER_ARGS if k in kwargs}
        planner_args = tuple(sorted((k, _frozen(v)) for k, v in given.items() if v is not None))
        return cls(planner_args=planner_args, **kwargs)

    @property
    def quantizing(self) -> bool:
        given = self.plan is not None
        return given or self.uniform is not None or self.bits is not None or self.arg("n_low") is not None

    @property
    def scoring(self) -> bool:
        """Whether the bits are allocated from scores (not uniform, not a given plan)."""
        return self.quantizing and self.uniform is None and self.plan is None

    def arg(self, name: str, default: Any = None) -> Any:
        return dict(self.planner_args).get(name, default)

    @property
    def group_size(self) -> int:
        return self.arg("group_size", DEFAULT_GROUP_SIZE)

    def with_args(self, **changes: Any) -> Recipe:
        args = dict(self.planner_args)
        args.update({k: _frozen(v) for k, v in changes.items()})
        return replace(self, planner_args=tuple(sorted((k, v) for k, v in args.items() if v is not None)))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["planner_args"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.planner_args}
        data["structure"] = asdict(self.structure)
        data["calibration"] = asdict(self.calibration)
        data["plan"] = None if self.plan is None else self.plan.to_dict()
        if self.grid == DEFAULT_GRID:  # absent unless set: recipes written before grids existed read the same
            del data["grid"]
        if self.rotate is None:  # as recipes were written before rotations existed
            del data["rotate"], data["rotate_seed"]
        if self.target is None:  # likewise for targets
            del data["target"]
        return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if data.get("format") != RECIPE_FORMAT or data.get("version") != RECIPE_VERSION:
            raise LayerwiseError(f"not a layerwise recipe of version {RECIPE_VERSION} (format {data.get('format')!r}, "
                                 f"version {data.get('version')!r})")
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        body["planner_args"] = tuple(sorted((k, _frozen(v)) for k, v in body.get("planner_args", {}).items()))
        body["structure"] = StructureConfig(**body.get("structure", {}))
        body["calibration"] = Calibration(**body.get("calibration", {}))
        body["plan"] = None if body.get("plan") is None else Plan.from_dict(body["plan"])
        return cls(**body)

    def compared(self) -> dict[str, Any]:
        """What must match for a resumed run to continue this one (everything but the device it runs on),
        flat, so that a difference is named by the argument (``group_size: 32 then, 64 now``)."""
        data = self.to_dict()
        data.pop("device")
        flat = {k: v for k, v in data.items() if k not in ("planner_args", "structure", "calibration")}
        flat.update(data["planner_args"])
        flat.update(data["structure"])
        flat.update({f"calib_{k}": v for k, v in data["calibration"].items()})
        return flat


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
