"""Remove whole decoder layers from a causal LM in place.

A removed layer must leave no trace a later run could trip over: the KV cache is indexed by each
attention module's ``layer_idx``, several models read ``config.num_hidden_layers`` / ``layer_types``
inside ``forward`` (gemma3 slices its layer list by the count and picks each layer's mask by its type),
and ``save_pretrained`` writes the config a plain ``from_pretrained`` rebuilds the model from. So
`remove_layers` edits the layer list, renumbers what indexes it, and updates the config and the few
model attributes cached from it, all after every check has passed.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from torch import nn

from layerwise.core.errors import LayerwiseError
from layerwise.model.adapter import decoder_layers, layers_path

# Config attributes holding the layer count (GPT-2 spells it n_layer; its num_hidden_layers is an alias).
LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers")
# Config lists with one entry per decoder layer (transformers checks both against num_hidden_layers).
PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types")


def decoder_config(model: nn.Module) -> Any:
    """The config that describes the decoder layers: the text config of a multimodal model, else the config."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config(decoder=True) if callable(get_text_config) else config


def check_layer_index(model: nn.Module, layer: int, what: str = "layer") -> int:
    """`layer` as a valid index into the decoder layers; the error names the valid range."""
    n_layers = len(decoder_layers(model))
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise LayerwiseError(f"{what} must be an integer layer index, got {layer!r}")
    if not 0 <= layer < n_layers:
        raise LayerwiseError(f"{what} {layer} is out of range: the model has layers 0..{n_layers - 1}")
    return layer


def remove_layers(model: nn.Module, layers: Collection[int]) -> None:
    """Remove decoder layers `layers` (indices into the current model) in place; an empty list does nothing.

    The kept layers are renumbered 0..K-1 (every ``layer_idx`` attribute in them, so each keeps a KV-cache
    slot of its own), and the config's layer count and per-layer lists are filtered to the kept layers,
    so ``save_pretrained`` + ``AutoModelForCausalLM.from_pretrained`` rebuilds the same model without
    layerwise. At least one layer must stay.
    """
    if isinstance(layers, int) or not isinstance(layers, Collection):
        raise LayerwiseError(f"pass the layers to remove as a list of indices, e.g. [{layers!r}], not {layers!r}")
    stack = decoder_layers(model)
    n_layers = len(stack)
    removed = {check_layer_index(model, i, "layer to remove") for i in layers}
    if not removed:
        return
    if len(removed) == n_layers:
        raise LayerwiseError(
            f"cannot remove all {n_layers} layers; at least one decoder layer must stay (remove fewer layers)"
        )
    kept = [i for i in range(n_layers) if i not in removed]
    config = decoder_config(model)
    _check_config(config, n_layers, kept)

    for index in sorted(removed, reverse=True):
        del stack[index]  # nn.ModuleList re-keys the rest: the state dict reads layers.0..K-1
    for new_index, layer in enumerate(stack):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    if config is not None:
        _update_config(config, kept)
        _update_cached_attributes(model, config)
    _update_device_map(model, kept)


def _check_config(config: Any, n_layers: int, kept: list[int]) -> None:
    """Refuse configs whose per-layer description cannot be filtered to `kept` without changing the model."""
    if config is None:
        return
    if getattr(config, "is_heterogeneous", False):
        raise LayerwiseError(
            f"{type(config).__name__} has per-layer overrides (per_layer_config); remove_layers cannot renumber "
            "them yet; remove layers from a model with a homogeneous config"
        )
    for attr in LAYER_COUNT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value != n_layers:
            raise LayerwiseError(
                f"the config says {attr}={value} but the model has {n_layers} decoder layers; fix the config "
                "before removing layers"
            )
    for attr in PER_LAYER_CONFIG_LISTS:
        value = getattr(config, attr, None)
        if value is not None and len(value) != n_layers:
            raise LayerwiseError(
                f"the config's {attr} has {len(value)} entries but the model has {n_layers} decoder layers; "
                "fix the config before removing layers"
            )
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and kept != list(range(len(kept))):
        # GPT-2 fixes each attention's scale to 1/(layer_idx + 1) at construction: a kept layer that moves
        # down would compute with its old scale here but get the new index's scale when reloaded.
        raise LayerwiseError(
            "this model scales attention by 1/(layer index + 1) (scale_attn_by_inverse_layer_idx), so a layer "
            "that moves to a new index would compute differently once saved and reloaded; remove only the last "
            "layers, or none"
        )


def _update_config(config: Any, kept: list[int]) -> None:
    """Set the layer count and filter every per-layer list to the kept layers (in place on the shared config)."""
    for attr in LAYER_COUNT_ATTRS:
        if isinstance(getattr(config, attr, None), int):
            setattr(config, attr, len(kept))
    for attr in PER_LAYER_CONFIG_LISTS:
        value = getattr(config, attr, None)
        if value is not None:
            setattr(config, attr, [value[i] for i in kept])
    # Qwen2 derives layer_types from "the first max_window_layers layers use full attention" when the list
    # is absent; keep the threshold meaning the same kept layers (layer_types, saved too, takes precedence).
    max_window_layers = getattr(config, "max_window_layers", None)
    if isinstance(max_window_layers, int) and not isinstance(max_window_layers, bool):
        config.max_window_layers = sum(1 for i in kept if i < max_window_layers)


def _update_cached_attributes(model: nn.Module, config: Any) -> None:
    """Model attributes computed from the config at init (qwen2's ``has_sliding_layers``)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return
    for module in model.modules():
        if isinstance(getattr(module, "has_sliding_layers", None), bool):
            module.has_sliding_layers = "sliding_attention" in layer_types


def _update_device_map(model: nn.Module, kept: list[int]) -> None:
    """Rename the layer entries of an accelerate ``hf_device_map`` (a model loaded with ``device_map``)."""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return
    pattern = re.compile(rf"^{re.escape(layers_path(model))}\.(\d+)(\..*)?$")
    new_index = {old: new for new, old in enumerate(kept)}
    updated = {}
    for name, device in device_map.items():
        match = pattern.match(name)
        if match is None:
            updated[name] = device
        elif int(match.group(1)) in new_index:
            updated[f"{layers_path(model)}.{new_index[int(match.group(1))]}{match.group(2) or ''}"] = device
    model.hf_device_map = updated
