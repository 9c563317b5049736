"""Drop the attention or the MLP of one decoder layer, keeping the rest of the layer.

A dropped sub-layer is replaced by a parameter-free module that adds nothing to the residual stream:
the decoder layer's own code (norms, residual adds, dropout) runs unchanged around it, so no
architecture needs a patched forward. Zero in gives zero out of every norm that may follow
(gemma3's post-attention / post-feed-forward RMSNorm: ``0 * rsqrt(0 + eps) * w == 0``).

The KV cache is the subtle part. transformers reads the number of tokens seen so far from the cache
(``past_key_values.get_seq_length()``, layer 0 by default) to place new tokens, and sizes the
attention masks from the first full-attention / first sliding cache layer. A layer whose slot never
grew would report 0 there and shift every position of the next step. So `DroppedAttention` still calls
``past_key_values.update`` for its own ``layer_idx`` with one zero key and value per token, of
shape ``[batch, 1, seq, 1]`` (or the slot's own head count and width once a static cache fixed them).
Width 1, not 0: ``DynamicLayer.get_seq_length`` returns 0 for an empty tensor, which a zero-width
slot always is. The cost is two numbers per token per dropped layer instead of two head vectors per
KV head, and sliding-window slots (gemma3, mistral) keep counting through their ``cumulative_length``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import SUBLAYERS
from layerwise.model.adapter import (
    attention_name,
    decoder_layers,
    linear_modules,
    linear_shape,
    mlp_names,
    set_submodule,
)
from layerwise.prune.layers import check_layer_index

try:  # transformers >= 5.x: slots of layers that keep no cache (KV sharing, attention-free layers)
    from transformers.cache_utils import DummyLayer as _DummyLayer
except ImportError:  # pragma: no cover - older 5.x releases
    _DummyLayer = ()


class DroppedAttention(nn.Module):
    """Stands in for a removed attention module: outputs zeros and keeps the layer's KV-cache slot in step.

    Returns ``(zeros like hidden_states, None)``, the ``(attn_output, attn_weights)`` pair every supported
    decoder layer unpacks. Takes whatever arguments the attention took (GPT-2 passes the hidden states
    positionally, the others by keyword) and ignores all but the cache.
    """

    def __init__(self, layer_idx: int | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # the cache slot; remove_layers renumbers it like any attention's

    def forward(
        self, hidden_states: torch.Tensor, *args: Any, past_key_values: Cache | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        cache = past_key_values
        if cache is None:
            cache = next((a for a in args if isinstance(a, Cache)), None)
        if cache is not None:
            self._advance_cache(cache, hidden_states)
        return torch.zeros_like(hidden_states), None

    def _advance_cache(self, cache: Cache, hidden_states: torch.Tensor) -> None:
        """Append one placeholder key/value per new token, so the slot's length counts the tokens seen."""
        cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache: the decoder's own slots
        if self.layer_idx is None:
            raise LayerwiseError(
                "a dropped attention without a layer_idx cannot keep the KV cache in step; drop the attention of "
                "a model whose attention modules carry layer_idx, or run with use_cache=False"
            )
        slots = getattr(cache, "layers", [])
        slot = slots[self.layer_idx] if self.layer_idx < len(slots) else None
        if isinstance(slot, _DummyLayer):
            return  # this slot stores nothing by design
        batch, seq = hidden_states.shape[0], hidden_states.shape[-2]
        keys = _placeholder(getattr(slot, "keys", None), batch, seq, hidden_states)
        values = _placeholder(getattr(slot, "values", None), batch, seq, hidden_states)
        cache.update(keys, values, self.layer_idx)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


def _placeholder(stored: torch.Tensor | None, batch: int, seq: int, like: torch.Tensor) -> torch.Tensor:
    """Zeros for `seq` tokens shaped like what the slot already holds ([batch, 1, seq, 1] when it holds nothing)."""
    heads, width = 1, 1
    if isinstance(stored, torch.Tensor) and stored.dim() == 4:  # a static slot allocated by early_initialization
        heads, width = stored.shape[1], stored.shape[3]
        like = stored
    return like.new_zeros(batch, heads, seq, width)


class DroppedMLP(nn.Module):
    """Stands in for a removed MLP module: returns zeros shaped like its input."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class DroppedLinear(nn.Module):
    """Stands in for a removed inline MLP linear (OPT's fc1 / fc2): zeros of width `out_features`.

    OPT calls ``fc2(activation(fc1(x)))`` inside the layer, so fc1 returns zero-width features (the
    activation and dropout then act on nothing) and fc2 zeros of the hidden size.
    """

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}"


def dropped_sublayers(layer: nn.Module) -> list[str]:
    """The sub-layers (``attn``, ``mlp``) of decoder layer module `layer` that were dropped, in SUBLAYERS order."""
    dropped = []
    if isinstance(getattr(layer, attention_name(layer)), DroppedAttention):
        dropped.append("attn")
    if all(isinstance(getattr(layer, name), (DroppedMLP, DroppedLinear)) for name in mlp_names(layer)):
        dropped.append("mlp")
    return dropped


def drop_sublayer(model: nn.Module, layer: int, which: str) -> None:
    """Replace sub-layer `which` (``attn`` or ``mlp``) of decoder layer `layer` by a zero-output stand-in.

    The layer keeps its other sub-layer, norms and KV-cache slot. Dropping both sub-layers of a layer, or
    the attention of every layer, is refused: the first is `remove_layers`, the second leaves nothing that
    mixes tokens.
    """
    if which not in SUBLAYERS:
        raise LayerwiseError(f"cannot drop sub-layer {which!r}; the sub-layers are {', '.join(SUBLAYERS)}")
    layers = decoder_layers(model)
    check_layer_index(model, layer)
    module = layers[layer]
    dropped = dropped_sublayers(module)
    if which in dropped:
        raise LayerwiseError(f"the {which} of layer {layer} is already dropped; drop it once")
    if dropped:
        raise LayerwiseError(
            f"layer {layer} has no {dropped[0]} left; dropping its {which} too removes the whole layer: "
            f"use prune (remove_layers) instead"
        )
    if which == "attn" and not any("attn" not in dropped_sublayers(m) for i, m in enumerate(layers) if i != layer):
        raise LayerwiseError(
            f"layer {layer} holds the model's last attention; dropping it means pruning all attention of a model, "
            "which leaves nothing that mixes tokens; keep the attention of at least one layer"
        )

    if which == "attn":
        name = attention_name(module)
        old = getattr(module, name)
        layer_idx = getattr(old, "layer_idx", layer)
        set_submodule(module, name, DroppedAttention(layer_idx if isinstance(layer_idx, int) else layer))
        return
    names = mlp_names(module)
    if names == ("mlp",):
        set_submodule(module, "mlp", DroppedMLP())
        return
    linears = linear_modules(module)
    first, last = names[0], names[-1]
    hidden = linear_shape(linears[last])[0] if last in linears else int(getattr(module, last).out_features)
    set_submodule(module, first, DroppedLinear(0))
    set_submodule(module, last, DroppedLinear(hidden))
