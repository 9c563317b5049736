"""What a rotation run asks for (`RotationConfig`) and what it did (`RotationRecord`, stored in layerwise.json).

A request is written ``KIND[:STAGES]``: KIND is how each orthogonal matrix is built (`ROTATION_KINDS`:
``hadamard``, a randomized Hadamard; ``random``, a random orthogonal matrix), STAGES which rotations are
fused, ``r1`` (the residual stream), ``r2`` (each attention head's values), joined by ``+``; both by default.
``hadamard`` is ``hadamard:r1+r2``; ``hadamard:r2`` fuses R2 only. ``auto`` (`AUTO`) is not a rotation but a
request the pipeline turns into one, or into none, for the run at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from layerwise.core.errors import LayerwiseError
from layerwise.transform.hadamard import ROTATION_KINDS, OrthogonalSpec

STAGES = ("r1", "r2")
# A request resolved per run by `layerwise.engine.pipeline` once the model is open: ``hadamard`` when the
# architecture allows R1, the head is not tied to the embedding, the quantizer reads a Hessian and the model
# is in memory; otherwise no rotation.
AUTO = "auto"
ROTATION_FORMAT = "layerwise.rotation"
ROTATION_VERSION = 1


@dataclass(frozen=True)
class RotationConfig:
    kind: str = "hadamard"
    stages: tuple[str, ...] = STAGES
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ROTATION_KINDS:
            raise LayerwiseError(f"unknown rotation {self.kind!r}; choose one of {', '.join(ROTATION_KINDS)} "
                                 "(optionally :r1, :r2 or :r1+r2)")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise LayerwiseError(f"unknown rotation stages {list(self.stages)}; write KIND, KIND:r1, KIND:r2 or "
                                 "KIND:r1+r2 (e.g. hadamard:r2)")
        object.__setattr__(self, "stages", tuple(s for s in STAGES if s in self.stages))

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> RotationConfig:
        """``hadamard``, ``hadamard:r2``, ``random:r1+r2`` ... as a config."""
        kind, _, stages = text.strip().partition(":")
        return cls(kind, tuple(s.strip() for s in stages.split("+")) if stages else STAGES, seed)

    @property
    def r1(self) -> bool:
        return "r1" in self.stages

    @property
    def r2(self) -> bool:
        return "r2" in self.stages

    def name(self) -> str:
        return self.kind if self.stages == STAGES else f"{self.kind}:{'+'.join(self.stages)}"


def head_seed(seed: int, layer: int, kv_head: int) -> int:
    """The seed of R2 for one KV head of one layer (numbered in the model as rotated), drawn from `seed`."""
    return int(np.random.SeedSequence([int(seed), 2, layer, kv_head]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class RotationRecord:
    """What `rotate_model` applied, for layerwise.json and the report.

    `r1`: the residual-stream matrix; `r2`: the first head's matrix (layer 0, KV head 0: every KV head of
    every layer has its own signs, seeded by `head_seed(seed, layer, kv_head)`, on the same factors);
    `folded_norms`: the RMSNorm scales were folded into the linears and set to identity; `untied_head`:
    the output head became a parameter of its own, `extra_parameters` more than before.
    """

    kind: str
    stages: tuple[str, ...]
    seed: int
    architecture: str
    r1: OrthogonalSpec | None
    r2: OrthogonalSpec | None
    folded_norms: bool
    untied_head: bool
    extra_parameters: int = 0
    online: tuple[str, ...] = ()  # rotations a runtime would have to apply: none are offered

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ROTATION_FORMAT, "version": ROTATION_VERSION, "kind": self.kind, "stages": list(self.stages),
            "seed": self.seed, "architecture": self.architecture,
            "r1": None if self.r1 is None else self.r1.to_dict(),
            "r2": None if self.r2 is None else {**self.r2.to_dict(), "seed": self.seed,
                                                "seeds": "per layer and KV head: head_seed(seed, layer, kv_head)"},
            "folded_norms": self.folded_norms, "untied_head": self.untied_head,
            "extra_parameters": self.extra_parameters, "online": list(self.online),
        }

    def describe(self) -> str:
        parts = []
        if self.r1 is not None:
            parts.append(f"R1 {self.r1.size}: {self.r1.describe()}")
        if self.r2 is not None:
            parts.append(f"R2 {self.r2.size} per KV head: {self.r2.describe()}")
        tail = ", norms folded" if self.folded_norms else ""
        if self.untied_head:
            tail += f", head untied (+{self.extra_parameters:,} parameters)"
        return f"{self.kind} seed {self.seed} ({'; '.join(parts)}{tail})"
