"""Weight transforms that keep the model's function: norm folding and fused rotations (R1, R2).

Imports only `layerwise.core` and `layerwise.model`. `rotate_model(model, RotationConfig.parse("hadamard"))`
rotates a float model in place and returns a `RotationRecord` for the checkpoint's metadata.
"""

from layerwise.transform.arch import auto_rotation
from layerwise.transform.config import AUTO, STAGES, RotationConfig, RotationRecord
from layerwise.transform.hadamard import ROTATION_KINDS, Orthogonal, OrthogonalSpec, orthogonal
from layerwise.transform.rotate import check_rotatable, rotate_model

__all__ = ["AUTO", "ROTATION_KINDS", "STAGES", "Orthogonal", "OrthogonalSpec", "RotationConfig", "RotationRecord",
           "auto_rotation", "check_rotatable", "orthogonal", "rotate_model"]
