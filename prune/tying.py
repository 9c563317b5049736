"""Tie decoder layers: a layer computes with another layer's weights and stores none of its own.

Tying shares weight-holding modules, not whole layers: the tied layer keeps its own attention module
and so its own ``layer_idx`` (KV-cache slot), attention type and sliding window, while every module
that holds tensors (``nn.Linear``, GPT-2's ``Conv1D``, norms, layerwise's ``QuantLinear``) becomes the
representative's object. A checkpoint then stores each shared tensor once, and quantizing the
representative's modules and tying again re-shares the quantized ones.
"""

from __future__ import annotations

import torch
from torch import nn

from layerwise.core.errors import LayerwiseError
from layerwise.model.adapter import LINEAR_TYPES, decoder_layers, linear_modules, linear_shape, set_submodule
from layerwise.prune.layers import check_layer_index

Signature = tuple[object, ...]


def _direct_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {**module._parameters, **module._buffers}
    return {name: t for name, t in tensors.items() if t is not None}


def _weight_holders(layer: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Modules of `layer` to share whole, and modules whose own parameters to share, by name in the layer.

    Shared whole: linear modules (float or quantized) and leaf modules holding tensors (norms), never one
    carrying a ``layer_idx``. Parameters only: any other module holding parameters directly. Buffers of
    non-leaf modules stay the layer's own (masks and tables, not weights).
    """
    linears = linear_modules(layer)
    whole: dict[str, nn.Module] = {}
    direct: dict[str, nn.Module] = {}
    for name, module in layer.named_modules():
        if any(name.startswith(f"{shared}.") for shared in whole):
            continue
        own = _direct_tensors(module)
        leaf = next(module.children(), None) is None
        if name and not hasattr(module, "layer_idx") and (name in linears or (own and leaf)):
            whole[name] = module
        elif any(p is not None for p in module._parameters.values()):
            direct[name] = module
    return whole, direct


def _layout(layer: nn.Module) -> dict[str, Signature]:
    """What must match for two layers to be tied: each holder's kind and tensor shapes, by module name."""
    linears = linear_modules(layer)
    whole, direct = _weight_holders(layer)
    layout: dict[str, Signature] = {}
    for name, module in whole.items():
        if name in linears:  # float and quantized versions of one linear match: only its shape counts
            layout[name] = ("linear", linear_shape(module), getattr(module, "bias", None) is not None)
        else:
            layout[name] = ("module", *sorted((n, tuple(t.shape)) for n, t in _direct_tensors(module).items()))
    for name, module in direct.items():
        params = {n: p for n, p in module._parameters.items() if p is not None}
        layout[f"{name}#parameters"] = ("parameters", *sorted((n, tuple(p.shape)) for n, p in params.items()))
    return layout


def check_tie(model: nn.Module, layer: int, to: int) -> None:
    """Raise unless `layer` can be tied to `to` (indices in range, distinct, same modules and shapes)."""
    check_layer_index(model, layer)
    check_layer_index(model, to, "tie target")
    if layer == to:
        raise LayerwiseError(f"cannot tie layer {layer} to itself; name another layer")
    _check_same_layout(decoder_layers(model), layer, to)


def _check_same_layout(layers: nn.ModuleList, layer: int, to: int) -> None:
    mine, theirs = _layout(layers[layer]), _layout(layers[to])
    if mine == theirs:
        return
    names = sorted(set(mine) ^ set(theirs))
    detail = (
        f"modules only in one of them: {', '.join(names)}"
        if names
        else "different shapes in " + ", ".join(n for n in sorted(mine) if mine[n] != theirs[n])
    )
    raise LayerwiseError(
        f"cannot tie layer {layer} to layer {to}: tying layers of different shapes ({detail}); tie only layers "
        "with the same modules and tensor shapes"
    )


def tie_layer(model: nn.Module, layer: int, to: int) -> None:
    """Make decoder layer `layer` compute with layer `to`'s weights, in place; idempotent.

    Every weight-holding module of `layer` becomes the same object as `to`'s (see `_weight_holders`), so
    calling it again after `to`'s linears were replaced (quantized) shares the new modules. `layer` keeps
    its own attention module, ``layer_idx`` and KV-cache slot. Whether `to` is itself kept is the caller's
    business.
    """
    check_tie(model, layer, to)
    layers = decoder_layers(model)
    target, representative = layers[layer], layers[to]
    whole, direct = _weight_holders(representative)
    for name, module in whole.items():
        set_submodule(target, name, module)
    for name, module in direct.items():
        own = target.get_submodule(name)
        for param_name, param in module._parameters.items():
            if param is not None:
                setattr(own, param_name, param)


def tied_to(model: nn.Module, layer: int) -> int | None:
    """The earlier layer whose weights `layer` computes with, or None.

    Read from the modules alone: the lowest-numbered earlier layer holding the same first linear object.
    Tied layers share every module symmetrically, so the lowest index of a group counts as its
    representative (layerwise plans tie later layers to earlier ones); the representative gives None.
    """
    layers = decoder_layers(model)
    check_layer_index(model, layer)
    linears = linear_modules(layers[layer])
    if not linears:
        return None
    name, module = next(iter(linears.items()))
    for index in range(layer):
        other = linear_modules(layers[index]).get(name)
        if other is module:
            return index
    return None


def average_layers(model: nn.Module, members: list[int], into: int) -> None:
    """Set layer `into`'s floating-point parameters to the mean of the `members`' (`into` among them).

    For tying by averaging: the representative then carries the whole group's weights before the others
    are tied to it. The mean is taken in float32 and cast back. Members must be full precision (average
    before quantizing) with the same parameter names and shapes.
    """
    layers = decoder_layers(model)
    if not members:
        raise LayerwiseError("average_layers needs at least one member layer")
    for index in members:
        check_layer_index(model, index, "member layer")
    if len(set(members)) != len(members):
        raise LayerwiseError(f"member layers {members} repeat an index; list each layer once")
    if into not in members:
        raise LayerwiseError(f"layer {into} must be among the members {members} it takes the mean of")
    for index in members:
        quantized = [n for n, m in linear_modules(layers[index]).items() if not isinstance(m, LINEAR_TYPES)]
        if quantized:
            raise LayerwiseError(
                f"layer {index} is already quantized ({quantized[0]}); average layers before quantizing them"
            )
    params = {i: {n: p for n, p in layers[i].named_parameters() if p.is_floating_point()} for i in members}
    shapes = {i: {n: tuple(p.shape) for n, p in params[i].items()} for i in members}
    for index in members:
        if shapes[index] != shapes[into]:
            raise LayerwiseError(
                f"cannot average layer {index} into layer {into}: tying layers of different shapes; average only "
                "layers with the same parameter names and shapes"
            )
    with torch.no_grad():
        for name, param in params[into].items():  # one name at a time: a layer's worth of float32 at most
            mean = torch.stack([params[i][name].to(param.device, torch.float32) for i in members]).mean(dim=0)
            param.copy_(mean.to(param.dtype))
