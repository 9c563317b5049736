import copy

import pytest
import torch
from conftest import random_windows, tiny_model
from prune_helpers import assert_cache_consistent, fingerprint, logits, unique_bytes
from torch import nn

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.model.adapter import (
    attention_name,
    decoder_layers,
    layers_path,
    linear_modules,
    linear_shape,
    set_submodule,
)
from layerwise.prune import average_layers, drop_sublayer, tie_layer, tied_to
from layerwise.quant import QuantLinear, quantize_module


def tensor_holders(layer: nn.Module) -> dict[str, nn.Module]:
    """Leaf modules holding tensors (linears, norms), by name in the layer."""
    return {
        name: m
        for name, m in layer.named_modules()
        if name and next(m.children(), None) is None and (list(m.parameters()) or list(m.buffers()))
    }


def test_tied_layer_shares_the_representatives_modules(arch):
    model = tiny_model(arch, n_layers=4)
    before = unique_bytes(model)
    tie_layer(model, 2, 1)
    layers = decoder_layers(model)
    holders, rep_holders = tensor_holders(layers[2]), tensor_holders(layers[1])
    assert holders.keys() == rep_holders.keys() and holders
    assert all(holders[name] is rep_holders[name] for name in holders)
    assert set(linear_modules(layers[2])) <= set(holders)
    # Its own identity: attention module (and with it layer_idx, sliding window, cache slot) stays its own.
    attention, rep_attention = (getattr(layers[i], attention_name(layers[i])) for i in (2, 1))
    assert attention is not rep_attention and attention.layer_idx == 2
    own = sum(t.numel() * t.element_size() for t in [*layers[1].parameters(), *layers[1].buffers()])
    assert unique_bytes(model) == before - own
    assert tied_to(model, 2) == 1 and tied_to(model, 1) is None and tied_to(model, 3) is None


def test_tied_layer_computes_with_the_representatives_weights(arch):
    model = tiny_model(arch, n_layers=4)
    reference = copy.deepcopy(model)
    path = layers_path(model)
    state = reference.state_dict()
    for key in list(state):
        if key.startswith(f"{path}.2."):
            state[key] = state[key.replace(f"{path}.2.", f"{path}.1.", 1)].clone()
    reference.load_state_dict(state)
    ids = random_windows(2, 16, seed=1)
    original = logits(model, ids)
    tie_layer(model, 2, 1)
    tied = logits(model, ids)
    torch.testing.assert_close(tied, logits(reference, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(tied, original, atol=1e-4)


def test_tied_layer_keeps_cache_consistent(arch):
    model = tiny_model(arch, n_layers=4)
    tie_layer(model, 2, 1)
    assert_cache_consistent(model)


def test_gemma3_tied_layer_keeps_its_own_attention_type():
    model = tiny_model("gemma3", n_layers=4)  # layer 1 full attention, layer 2 sliding
    tie_layer(model, 2, 1)
    layers = decoder_layers(model)
    assert layers[2].self_attn.is_sliding and not layers[1].self_attn.is_sliding
    assert layers[2].self_attn.q_proj is layers[1].self_attn.q_proj


def test_tie_is_idempotent_and_reshares_quantized_modules(arch):
    model = tiny_model(arch, n_layers=4)
    tie_layer(model, 2, 1)
    tie_layer(model, 2, 1)
    layers = decoder_layers(model)
    for name, module in linear_modules(layers[1]).items():  # quantize the representative, as the applier does
        set_submodule(layers[1], name, quantize_module(module, QuantSpec(4, 32)))
    assert not any(isinstance(m, QuantLinear) for m in linear_modules(layers[2]).values())
    half_shared = unique_bytes(model)
    tie_layer(model, 2, 1)
    assert unique_bytes(model) < half_shared  # layer 2's float linears are gone
    quantized = linear_modules(layers[2])
    assert all(isinstance(m, QuantLinear) and m is linear_modules(layers[1])[n] for n, m in quantized.items())
    before = fingerprint(model)
    tie_layer(model, 2, 1)
    assert fingerprint(model) == before
    assert_cache_consistent(model)


def test_parameters_held_by_non_leaf_modules_are_shared_and_their_buffers_kept():
    model = tiny_model("llama", n_layers=4)
    for layer in decoder_layers(model):
        layer.self_attn.gain = nn.Parameter(torch.randn(4))
        layer.self_attn.register_buffer("table", torch.randn(3))
    tie_layer(model, 2, 1)
    layers = decoder_layers(model)
    assert layers[2].self_attn is not layers[1].self_attn
    assert layers[2].self_attn.gain is layers[1].self_attn.gain
    assert layers[2].self_attn.table is not layers[1].self_attn.table


def test_tie_refuses_self_and_out_of_range():
    model = tiny_model("llama", n_layers=4)
    before = fingerprint(model)
    with pytest.raises(LayerwiseError, match="cannot tie layer 1 to itself"):
        tie_layer(model, 1, 1)
    with pytest.raises(LayerwiseError, match="tie target 4 is out of range"):
        tie_layer(model, 1, 4)
    with pytest.raises(LayerwiseError, match="layer -1 is out of range"):
        tie_layer(model, -1, 0)
    assert fingerprint(model) == before


def test_tie_refuses_layers_of_different_shapes(arch):
    model = tiny_model(arch, n_layers=4)
    layer = decoder_layers(model)[3]
    name, module = next(iter(linear_modules(layer).items()))
    out_features, in_features = linear_shape(module)
    set_submodule(layer, name, nn.Linear(in_features, out_features + 8))
    before = fingerprint(model)
    with pytest.raises(LayerwiseError, match=rf"tying layers of different shapes \(different shapes in {name}\)"):
        tie_layer(model, 3, 1)
    with pytest.raises(LayerwiseError, match="tying layers of different shapes"):
        tie_layer(model, 1, 3)
    assert fingerprint(model) == before


def test_tie_refuses_a_layer_with_a_dropped_sublayer(arch):
    model = tiny_model(arch, n_layers=4)
    drop_sublayer(model, 3, "attn")
    before = fingerprint(model)
    with pytest.raises(LayerwiseError, match="tying layers of different shapes \\(modules only in one of them"):
        tie_layer(model, 3, 1)
    assert fingerprint(model) == before


def test_average_layers_sets_the_mean_then_ties(arch):
    model = tiny_model(arch, n_layers=4)
    layers = decoder_layers(model)
    expected = {
        name: (p + dict(layers[2].named_parameters())[name] + dict(layers[3].named_parameters())[name]) / 3
        for name, p in layers[1].named_parameters()
    }
    average_layers(model, [1, 2, 3], into=1)
    for name, p in layers[1].named_parameters():
        torch.testing.assert_close(p, expected[name])
    for member in (2, 3):
        tie_layer(model, member, 1)
    assert_cache_consistent(model)


@pytest.mark.parametrize(
    ("members", "into", "message"),
    [
        ([], 1, "needs at least one member"),
        ([1, 2], 3, "layer 3 must be among the members"),
        ([1, 1, 2], 1, "repeat an index"),
        ([1, 4], 1, "member layer 4 is out of range"),
    ],
)
def test_average_layers_refuses_bad_members(members, into, message):
    model = tiny_model("llama", n_layers=4)
    before = fingerprint(model)
    with pytest.raises(LayerwiseError, match=message):
        average_layers(model, members, into)
    assert fingerprint(model) == before


def test_average_layers_refuses_different_shapes_and_quantized_layers():
    model = tiny_model("llama", n_layers=4)
    layers = decoder_layers(model)
    layers[3].mlp.down_proj = nn.Linear(100, 64, bias=False)
    layers[2].mlp.down_proj = quantize_module(layers[2].mlp.down_proj, QuantSpec(4, 32))
    before = fingerprint(model)
    with pytest.raises(LayerwiseError, match="tying layers of different shapes"):
        average_layers(model, [0, 3], into=0)
    with pytest.raises(LayerwiseError, match="layer 2 is already quantized \\(mlp.down_proj\\)"):
        average_layers(model, [0, 2], into=0)
    assert fingerprint(model) == before
