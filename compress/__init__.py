"""layerwise: layer-wise mixed-precision compression of Hugging Face causal language models.

    import layerwise
    result = layerwise.compress("smollm2-135m", bits=3.25, scorer="lim", method="rtn", group_size=128)
    layerwise.save(result, "smollm2-3.25b")
    ckpt = layerwise.load("smollm2-3.25b")

The public API is imported lazily so that `layerwise --help` and `import layerwise.core.types` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "compress": "layerwise.api",
    "score": "layerwise.api",
    "make_plan": "layerwise.api",
    "apply": "layerwise.api",
    "CompressResult": "layerwise.api",
    "save": "layerwise.api",
    "load": "layerwise.output.checkpoint",
    "LayerwiseError": "layerwise.core.errors",
    "LayerScores": "layerwise.core.types",
    "LayerAction": "layerwise.core.types",
    "Plan": "layerwise.core.types",
    "QuantSpec": "layerwise.core.types",
}
_RENAMED = {"load": "load_checkpoint"}

if TYPE_CHECKING:
    from layerwise.api import CompressResult, apply, compress, make_plan, save, score
    from layerwise.core.errors import LayerwiseError
    from layerwise.core.types import LayerAction, LayerScores, Plan, QuantSpec
    from layerwise.output.checkpoint import load_checkpoint as load

__all__ = [
    "CompressResult", "LayerAction", "LayerScores", "LayerwiseError", "Plan", "QuantSpec",
    "apply", "compress", "load", "make_plan", "save", "score",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'layerwise' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), _RENAMED.get(name, name))
