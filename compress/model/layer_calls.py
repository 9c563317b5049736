"""How layerwise talks to a decoder layer's call: its hidden-state input and output, a forward put in its
place for a while, and the next-token loss its model is measured with.

Decoder layers take the hidden state as their first positional argument or as ``hidden_states=``, and
return a tensor or a tuple whose first item is the hidden state; every hook and override in layerwise
reads and writes them through these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORED = -100  # cross_entropy's ignore_index: the last position of a window has no next token


@dataclass
class LayerCall:
    """The arguments a decoder layer was called with, apart from its hidden-state input."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def split_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, LayerCall]:
    """The hidden-state input of a layer call, and the rest of the call."""
    kwargs = dict(kwargs)
    if args:
        return args[0], LayerCall(tuple(args[1:]), kwargs)
    return kwargs.pop("hidden_states"), LayerCall((), kwargs)


def replace_hidden(args: tuple[Any, ...], kwargs: dict[str, Any],
                   hidden: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The same call with `hidden` as its hidden-state input (for forward pre-hooks)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def layer_output(output: Any) -> torch.Tensor:
    """Decoder layers return a tensor or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple | list) else output


@contextmanager
def overridden_forward(forwards: Mapping[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Each module's `forward` replaced by the given function for the duration of the block.

    The override is an instance attribute; a forward already set on the instance (accelerate's hooks,
    an enclosing override) is put back afterwards, else the class's forward is used again.
    """
    saved = {module: module.__dict__.get("forward") for module in forwards}
    try:
        for module, forward in forwards.items():
            module.forward = forward
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward


def shifted_targets(batch: torch.Tensor) -> torch.Tensor:
    """Next-token targets of token windows, `IGNORED` at each window's last position.

    Shifting the targets rather than slicing the logits keeps the (tokens x vocabulary) logits uncopied.
    """
    targets = torch.full_like(batch, IGNORED)
    targets[:, :-1] = batch[:, 1:]
    return targets


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (nats) of `logits` [batch, length, vocab] against `shifted_targets`, in float32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum",
                           ignore_index=IGNORED)
