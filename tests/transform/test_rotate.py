"""Fused rotations on tiny random models: the rotated model computes the same logits (norm scales made
non-uniform first, so folding is exercised), the weights really change, and what cannot be rotated exactly
is refused before anything changes."""

from __future__ import annotations

import pytest
import torch
from conftest import random_windows, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

import layerwise
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerAction, Plan
from layerwise.model.adapter import decoder_layers
from layerwise.transform import RotationConfig, check_rotatable, rotate_model

TOLERANCE = 1e-4  # max |logit difference| / max |logit|
IDS = random_windows(2, 20, seed=4)


def roughen(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-uniform norm scales and non-zero biases, so folding and bias rotation are really exercised."""
    generator = torch.Generator().manual_seed(seed)
    offset = 1.0 if model.config.model_type.startswith("gemma") else 0.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.empty(param.shape).uniform_(0.25, 2.0, generator=generator) - offset)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def model_of(arch: str, tied: bool | None = None, **config_changes) -> torch.nn.Module:
    config = tiny_config(arch)
    if tied is not None:
        config.tie_word_embeddings = tied
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return roughen(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())


CASES = [
    ("llama", "hadamard", {}),
    ("llama", "random", {}),
    ("llama", "hadamard:r1", {"attention_bias": True, "mlp_bias": True}),  # o_proj/down_proj biases: writers
    ("mistral", "hadamard", {}),
    ("qwen2", "hadamard", {}),  # q/k/v biases; v's rotates with R2
    ("phi3", "hadamard", {}),  # fused qkv_proj and gate_up_proj
    ("gemma3", "hadamard:r2", {}),
    ("llama", "hadamard:r2", {"num_key_value_heads": 1}),  # every query head reads one KV head
]


@pytest.mark.parametrize(("arch", "rotate", "changes"), CASES)
def test_rotation_keeps_the_logits(arch, rotate, changes):
    model = model_of(arch, **changes)
    reference = logits(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = rotate_model(model, RotationConfig.parse(rotate, seed=3))
    assert relative(logits(model), reference) < TOLERANCE
    config = RotationConfig.parse(rotate)
    assert record.stages == config.stages and (record.r1 is not None) == config.r1
    changed = [n for n, p in model.named_parameters() if n in before and not torch.allclose(p, before[n], atol=1e-3)]
    layer0 = [n for n in changed if ".layers.0." in n]
    if config.r2:
        assert any("v_proj" in n or "qkv_proj" in n for n in layer0) and any("o_proj" in n for n in layer0)
    if config.r1:
        assert any("embed_tokens" in n for n in changed) and any("down_proj" in n for n in layer0)
        offset = 1.0 if arch == "gemma3" else 0.0
        norms = [p for n, p in model.named_parameters() if "norm" in n]
        assert norms and all(torch.equal(p, torch.full_like(p, 1.0 - offset)) for p in norms)


def test_without_folding_r1_would_not_be_exact():
    """The check above is not vacuous: rotating the stream while leaving the norm scales in place changes
    the logits of a model whose norm scales are not uniform."""
    model = model_of("llama")
    reference = logits(model)
    scales = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    rotate_model(model, RotationConfig.parse("hadamard:r1"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in scales:
                param.copy_(scales[name])  # put the scales back: the norms now scale the rotated stream
    assert relative(logits(model), reference) > 100 * TOLERANCE


def test_tied_head_is_untied_and_reloads(tmp_path):
    model = model_of("llama", tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = logits(model)
    record = rotate_model(model, RotationConfig())
    assert record.untied_head and model.config.tie_word_embeddings is False
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert record.extra_parameters == model.lm_head.weight.numel()
    assert relative(logits(model), reference) < TOLERANCE
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.equal(logits(again), logits(model))


def test_untied_head_stays_a_parameter_of_its_own():
    model = model_of("llama", tied=False)
    record = rotate_model(model, RotationConfig())
    assert not record.untied_head and record.extra_parameters == 0


def test_seed_changes_the_weights_not_the_function():
    a, b = model_of("llama"), model_of("llama")
    rotate_model(a, RotationConfig(seed=0))
    rotate_model(b, RotationConfig(seed=1))
    assert not torch.allclose(a.model.embed_tokens.weight, b.model.embed_tokens.weight, atol=1e-3)
    assert relative(logits(a), logits(b)) < TOLERANCE


@pytest.mark.parametrize(("arch", "rotate", "message"), [
    ("gemma3", "hadamard", "sandwich norms"),
    ("gemma3", "hadamard:r1", "hadamard:r2"),
    ("gpt2", "hadamard", "LayerNorm"),
    ("opt", "hadamard:r2", "LayerNorm"),
])
def test_inexact_architectures_are_refused_before_anything_changes(arch, rotate, message):
    model = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(LayerwiseError, match=message):
        rotate_model(model, RotationConfig.parse(rotate))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_unknown_architecture_is_refused():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(LayerwiseError, match="does not know the layout of 'mystery'"):
        check_rotatable(model, RotationConfig())


def test_quantized_layers_are_refused():
    model = tiny_model("llama")
    layerwise.apply(model, Plan([LayerAction(i, "quantize", 4, 32) for i in range(4)]), "rtn", progress=False)
    with pytest.raises(LayerwiseError, match="already quantized"):
        rotate_model(model, RotationConfig())


def test_bad_rotation_requests_are_refused():
    with pytest.raises(LayerwiseError, match="unknown rotation 'givens'"):
        RotationConfig.parse("givens")
    with pytest.raises(LayerwiseError, match="unknown rotation stages"):
        RotationConfig.parse("hadamard:r3")


def test_tied_and_dropped_layers_rotate_once():
    """Tied layers share their modules: each is rotated once; a dropped MLP has no linears to rotate."""
    from layerwise.prune import drop_sublayer, tie_layer

    model = model_of("llama")
    tie_layer(model, 2, 1)
    drop_sublayer(model, 3, "mlp")
    reference = logits(model)
    rotate_model(model, RotationConfig())
    layers = decoder_layers(model)
    assert layers[2].self_attn.q_proj is layers[1].self_attn.q_proj
    assert relative(logits(model), reference) < TOLERANCE
