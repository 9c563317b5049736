"""The sensitivity scorer's Fisher pass and its use of a subset of the calibration windows."""

import pytest
import torch
from conftest import ARCHS, random_windows, tiny_model

from layerwise.core.types import module_units, unit_name
from layerwise.importance import score_model
from layerwise.importance.sensitivity import output_fisher
from layerwise.model.adapter import decoder_layers, linear_modules


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk_tokens", (5, 128))
def test_checkpointed_chunked_fisher_matches_plain_autograd(arch: str, chunk_tokens: int) -> None:
    model = tiny_model(arch)
    if arch == "gemma3":  # the head's output is soft-capped: the chunked loss must cap too
        model.config.final_logit_softcapping = 3.0
    windows = random_windows(2, 16)
    fisher = output_fisher(model, windows, batch_size=1, chunk_tokens=chunk_tokens)

    # Reference: gradients of the summed NLL with respect to every layer's output, no checkpointing.
    layers = decoder_layers(model)
    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for layer in layers
    ]
    expected = [torch.zeros(()) for _ in layers]
    for window in windows.split(1):
        outputs.clear()
        logits = model(input_ids=window, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(), reduction="sum")
        grads = torch.autograd.grad(loss, outputs)
        expected = [e + g.pow(2).sum(dim=(0, 1)) for e, g in zip(expected, grads, strict=True)]
    for handle in handles:
        handle.remove()
    for got, want in zip(fisher, expected, strict=True):
        torch.testing.assert_close(got, want / windows.numel(), rtol=1e-4, atol=1e-9)
    # every layer's own forward is back and parameters kept their flags
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert all(p.requires_grad for p in model.parameters())


def test_stream_reads_only_the_windows_the_scorers_need() -> None:
    model = tiny_model("llama")
    windows = random_windows(6, 12)
    options = {"sensitivity": {"options": "2:32,4:32", "damage_windows": 2}}
    alone = score_model(model, ["sensitivity"], windows, calibration={"windows": 6}, scorer_options=options,
                        progress=False)
    assert alone["sensitivity"].calibration["windows"] == 2
    together = score_model(model, ["lim", "sensitivity"], windows, calibration={"windows": 6},
                           scorer_options=options, progress=False)
    assert together["lim"].calibration["windows"] == 6
    # the damage is measured on the same two windows either way
    for option, damage in alone["sensitivity"].option_damage.items():
        assert together["sensitivity"].option_damage[option] == pytest.approx(damage, rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
def test_damage_per_module_unit(arch: str) -> None:
    """At module granularity every linear is measured alone per option: each unit's damage falls from 2 to 8
    bits, and a layer's damage per option is the sum of its units'. Fused units are measured as one, and the
    units the two granularities share get the same values."""
    model = tiny_model(arch, n_layers=2)
    windows = random_windows(3, 16)

    def scores(granularity: str):
        options = {"sensitivity": {"options": "2:32,8:32", "damage_windows": 3, "granularity": granularity}}
        return score_model(model, ["sensitivity"], windows, scorer_options=options, progress=False)["sensitivity"]

    per_module, fused = scores("module"), scores("fused")
    names = list(linear_modules(decoder_layers(model)[0]))
    for i, units in enumerate(per_module.module_damage):
        assert list(units) == names
        assert all(u["8:32:rtn"] < u["2:32:rtn"] for u in units.values())
        for option, damage in per_module.option_damage.items():
            assert damage[i] == pytest.approx(sum(u[option] for u in units.values()))
        expected = [unit_name(u) for u in module_units(names, "fused")]
        assert list(fused.module_damage[i]) == expected
        for unit in set(units) & set(fused.module_damage[i]):
            assert fused.module_damage[i][unit] == units[unit]
    assert not scores("layer").module_damage
