"""Fold RMSNorm scales into the linears that read the norm's output.

An RMSNorm computes ``x / rms(x) * g`` (gemma: ``* (1 + w)``); a linear reading it computes
``(x / rms(x) * g) Wᵀ = (x / rms(x)) (W diag(g))ᵀ``. Scaling W's input columns by g and setting the norm's
scale to one (gemma: w to 0) gives the same outputs, and leaves a norm that is only ``x / rms(x)``, which
commutes with any orthogonal Q: ``rms(x Q) = rms(x)``. That is what makes R1 exact.
"""

from __future__ import annotations

import torch
from torch import nn

from layerwise.transform.arch import ArchFacts
from layerwise.transform.edits import Edits


def norm_scale(norm: nn.Module, offset: float, edits: Edits) -> torch.Tensor:
    """The per-channel factor the norm multiplies by, in float64."""
    return edits.get(norm.weight) + offset


def make_identity(norm: nn.Module, offset: float, edits: Edits) -> None:
    edits.put(norm.weight, torch.full(tuple(norm.weight.shape), 1.0 - offset, dtype=torch.float64))


def fold_norm(norm: nn.Module, readers: list[nn.Module], offset: float, edits: Edits) -> None:
    """Scale each reader's input columns by the norm's factor; the norm becomes the identity scale."""
    scale = norm_scale(norm, offset, edits)
    for linear in readers:
        edits.put(linear.weight, edits.get(linear.weight) * scale)
    make_identity(norm, offset, edits)


def fold_layer(layer: nn.Module, facts: ArchFacts, edits: Edits, present: dict[str, nn.Module]) -> None:
    """Fold one decoder layer's pre-norms into their readers (`present`: the layer's linears by name; a
    dropped sub-layer has none, and its norm's output is not read, so the norm is only reset)."""
    for norm_name, reader_names in facts.norm_readers:
        readers = [present[n] for n in reader_names if n in present]
        fold_norm(layer.get_submodule(norm_name), readers, facts.norm_offset, edits)
