import copy

import pytest
import torch
from conftest import random_windows, tiny_model
from prune_helpers import assert_cache_consistent, fingerprint, logits

from layerwise.core.errors import LayerwiseError
from layerwise.model.adapter import attention_name, decoder_layers, layers_path, mlp_names
from layerwise.prune import (
    DroppedAttention,
    DroppedLinear,
    DroppedMLP,
    drop_sublayer,
    dropped_sublayers,
    remove_layers,
)

# The projection that writes each sub-layer's result into the residual stream, by architecture layout:
# zeroing its weight and bias makes the sub-layer contribute exactly nothing (the reference for a drop).
ATTN_OUT = ("o_proj", "out_proj", "c_proj")
MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "fc2")


def zero_output_projection(layer, sublayer: str) -> None:
    if sublayer == "attn":
        attention = getattr(layer, attention_name(layer))
        module = next(getattr(attention, n) for n in ATTN_OUT if hasattr(attention, n))
    else:
        module = next(layer.get_submodule(n) for n in MLP_OUT if _has(layer, n))
    with torch.no_grad():
        module.weight.zero_()
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()


def _has(layer, name: str) -> bool:
    try:
        layer.get_submodule(name)
    except AttributeError:
        return False
    return True


@pytest.mark.parametrize("layer", [0, 2])
def test_dropped_attention_keeps_cache_consistent(arch, layer):
    """Layer 0 is the slot transformers reads the sequence length from; layer 2 is an ordinary one."""
    model = tiny_model(arch, n_layers=4)
    drop_sublayer(model, layer, "attn")
    assert dropped_sublayers(decoder_layers(model)[layer]) == ["attn"]
    assert_cache_consistent(model)


def test_dropped_mlp_keeps_cache_consistent(arch):
    model = tiny_model(arch, n_layers=4)
    drop_sublayer(model, 1, "mlp")
    assert dropped_sublayers(decoder_layers(model)[1]) == ["mlp"]
    assert_cache_consistent(model)


@pytest.mark.parametrize("sublayer", ["attn", "mlp"])
def test_drop_equals_zeroing_the_output_projection(arch, sublayer):
    model = tiny_model(arch, n_layers=4)
    reference = copy.deepcopy(model)
    zero_output_projection(decoder_layers(reference)[1], sublayer)
    ids = random_windows(2, 16, seed=1)
    original = logits(model, ids)
    drop_sublayer(model, 1, sublayer)
    dropped = logits(model, ids)
    torch.testing.assert_close(dropped, logits(reference, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(dropped, original, atol=1e-4)


def test_dropped_modules_hold_no_tensors(arch):
    model = tiny_model(arch, n_layers=4)
    n_params = sum(p.numel() for p in model.parameters())
    prefix = f"{layers_path(model)}.1.{attention_name(decoder_layers(model)[1])}."
    assert [k for k in model.state_dict() if k.startswith(prefix)]
    drop_sublayer(model, 1, "attn")
    drop_sublayer(model, 2, "mlp")
    layers = decoder_layers(model)
    attn = getattr(layers[1], attention_name(layers[1]))
    mlps = [getattr(layers[2], n) for n in mlp_names(layers[2])]
    assert isinstance(attn, DroppedAttention) and attn.layer_idx == 1
    assert all(isinstance(m, (DroppedMLP, DroppedLinear)) for m in mlps)
    for module in [attn, *mlps]:
        assert not list(module.parameters()) and not list(module.buffers())
    assert not [k for k in model.state_dict() if k.startswith(prefix)]
    assert sum(p.numel() for p in model.parameters()) < n_params


def test_opt_inline_mlp_is_replaced_by_zero_width_linears():
    model = tiny_model("opt", n_layers=4)
    drop_sublayer(model, 1, "mlp")
    layer = decoder_layers(model)[1]
    x = torch.randn(2, 5, 64)
    assert layer.fc1(x).shape == (2, 5, 0)
    assert torch.equal(layer.fc2(layer.activation_fn(layer.fc1(x))), torch.zeros(2, 5, 64))


def test_static_cache_and_beam_search_with_dropped_attention():
    """Also the other cache paths generate takes: a static cache (gemma3's sliding and full slots) and beams."""
    model = tiny_model("gemma3", n_layers=4)
    drop_sublayer(model, 0, "attn")
    drop_sublayer(model, 3, "attn")
    ids = random_windows(2, 10, seed=3)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        plain = model.generate(ids, use_cache=False, **kwargs)
        static = model.generate(ids, cache_implementation="static", **kwargs)
        beams = model.generate(ids, num_beams=2, **kwargs)
        beams_uncached = model.generate(ids, num_beams=2, use_cache=False, **kwargs)
    assert torch.equal(plain, static)
    assert torch.equal(beams, beams_uncached)


def test_removing_an_earlier_layer_renumbers_the_dropped_attention(arch):
    model = tiny_model(arch, n_layers=4)
    drop_sublayer(model, 2, "attn")
    remove_layers(model, [0])
    layer = decoder_layers(model)[1]
    assert getattr(layer, attention_name(layer)).layer_idx == 1
    assert_cache_consistent(model)


def test_unknown_sublayer_is_refused():
    model = tiny_model("llama", n_layers=4)
    before = fingerprint(model)
    with pytest.raises(LayerwiseError, match="cannot drop sub-layer 'ffn'; the sub-layers are attn, mlp"):
        drop_sublayer(model, 1, "ffn")
    with pytest.raises(LayerwiseError, match="layer 4 is out of range"):
        drop_sublayer(model, 4, "attn")
    assert fingerprint(model) == before


@pytest.mark.parametrize("sublayer", ["attn", "mlp"])
def test_dropping_twice_is_refused(arch, sublayer):
    model = tiny_model(arch, n_layers=4)
    drop_sublayer(model, 1, sublayer)
    before = fingerprint(model)
    with pytest.raises(LayerwiseError, match=f"the {sublayer} of layer 1 is already dropped"):
        drop_sublayer(model, 1, sublayer)
    assert fingerprint(model) == before


@pytest.mark.parametrize(("first", "second"), [("attn", "mlp"), ("mlp", "attn")])
def test_dropping_both_sublayers_points_to_prune(arch, first, second):
    model = tiny_model(arch, n_layers=4)
    drop_sublayer(model, 1, first)
    before = fingerprint(model)
    with pytest.raises(LayerwiseError, match=r"removes the whole layer: use prune \(remove_layers\)"):
        drop_sublayer(model, 1, second)
    assert fingerprint(model) == before
    assert dropped_sublayers(decoder_layers(model)[1]) == [first]


def test_dropping_the_last_attention_is_refused(arch):
    model = tiny_model(arch, n_layers=4)
    for layer in (0, 1, 3):
        drop_sublayer(model, layer, "attn")
    before = fingerprint(model)
    with pytest.raises(LayerwiseError, match="pruning all attention of a model"):
        drop_sublayer(model, 2, "attn")
    assert fingerprint(model) == before
    assert_cache_consistent(model)  # one attention left: still a working model
