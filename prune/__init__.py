"""Structural edits of a causal LM, in place: remove decoder layers, drop a layer's attention or MLP, tie layers.

Each function checks everything before it touches the model and raises `LayerwiseError` naming the
problem and the fix, so a refused edit leaves the model as it was. `layerwise.engine.applier` applies a plan's
prune / drop / tie actions through these.
"""

from layerwise.prune.layers import remove_layers
from layerwise.prune.sublayers import DroppedAttention, DroppedLinear, DroppedMLP, drop_sublayer, dropped_sublayers
from layerwise.prune.tying import average_layers, check_tie, tie_layer, tied_to

__all__ = [
    "DroppedAttention",
    "DroppedLinear",
    "DroppedMLP",
    "average_layers",
    "check_tie",
    "drop_sublayer",
    "dropped_sublayers",
    "remove_layers",
    "tie_layer",
    "tied_to",
]
