import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ARCHS, random_windows, tiny_model
from prune_helpers import assert_cache_consistent, fingerprint, logits
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

from layerwise.core.errors import LayerwiseError
from layerwise.model.adapter import decoder_layers
from layerwise.prune import remove_layers


class SkipLayer(nn.Module):
    """A decoder layer that passes its input through: the reference for a removed layer."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def layer_indices(model) -> list[list[int]]:
    return [
        [m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        for layer in decoder_layers(model)
    ]


def test_unmodified_model_decodes_the_same_with_and_without_cache(arch):
    assert_cache_consistent(tiny_model(arch, n_layers=4))


def test_remove_middle_layer_renumbers_and_keeps_cache_consistent(arch):
    model = tiny_model(arch, n_layers=4)
    kept = [decoder_layers(model)[i] for i in (0, 2, 3)]
    remove_layers(model, [1])
    assert list(decoder_layers(model)) == kept
    assert all(indices and set(indices) == {i} for i, indices in enumerate(layer_indices(model)))
    config = model.config
    assert config.num_hidden_layers == 3
    if getattr(config, "layer_types", None) is not None:
        assert len(config.layer_types) == 3
    assert_cache_consistent(model)


@pytest.mark.parametrize("removed", [[1], [0, 2]])
def test_removed_layers_are_skipped(arch, removed):
    model = tiny_model(arch, n_layers=4)
    reference = copy.deepcopy(model)
    for i in removed:
        decoder_layers(reference)[i] = SkipLayer()
    remove_layers(model, removed)
    ids = random_windows(2, 16, seed=1)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(model, ids), logits(tiny_model(arch, n_layers=4), ids), atol=1e-4)


def test_gemma3_keeps_each_layer_type():
    model = tiny_model("gemma3", n_layers=4)
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    remove_layers(model, [1])
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert [layer.self_attn.is_sliding for layer in decoder_layers(model)] == [True, True, False]


def test_qwen2_sliding_layers_and_window_threshold_follow_the_kept_layers():
    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_sliding_window=True, sliding_window=8, max_window_layers=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert model.model.has_sliding_layers
    remove_layers(model, [2, 3])
    assert model.config.layer_types == ["full_attention"] * 2
    assert model.config.max_window_layers == 2
    assert not model.model.has_sliding_layers
    assert_cache_consistent(model)


def test_empty_removal_is_a_no_op(arch):
    model = tiny_model(arch, n_layers=4)
    before = fingerprint(model)
    remove_layers(model, [])
    assert fingerprint(model) == before


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([4], "out of range: the model has layers 0..3"),
        ([1, -1], "out of range"),
        ([0, 1, 2, 3], "at least one decoder layer must stay"),
        (["1"], "must be an integer layer index"),
        ([True], "must be an integer layer index"),
        (2, "as a list of indices"),
    ],
)
def test_bad_removals_are_refused_before_any_change(layers, message):
    model = tiny_model("gemma3", n_layers=4)
    before = fingerprint(model)
    with pytest.raises(LayerwiseError, match=message):
        remove_layers(model, layers)
    assert fingerprint(model) == before
    assert len(decoder_layers(model)) == 4


def test_config_that_disagrees_with_the_model_is_refused():
    model = tiny_model("llama", n_layers=4)
    model.config.num_hidden_layers = 5
    before = fingerprint(model)
    with pytest.raises(LayerwiseError, match="num_hidden_layers=5 but the model has 4"):
        remove_layers(model, [1])
    assert fingerprint(model) == before


def test_gpt2_inverse_layer_scaling_allows_only_trailing_removal():
    config = GPT2Config(vocab_size=96, n_embd=64, n_layer=4, n_head=4, n_positions=256,
                        scale_attn_by_inverse_layer_idx=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    before = fingerprint(model)
    with pytest.raises(LayerwiseError, match="scale_attn_by_inverse_layer_idx"):
        remove_layers(model, [1])
    assert fingerprint(model) == before
    remove_layers(model, [3])
    assert model.config.n_layer == 3


def test_device_map_entries_follow_the_renumbering():
    model = tiny_model("llama", n_layers=4)
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": 0,
                           "model.layers.2.mlp": 1, "model.layers.3": "cpu", "lm_head": "cpu"}
    remove_layers(model, [1])
    assert model.hf_device_map == {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1.mlp": 1,
                                   "model.layers.2": "cpu", "lm_head": "cpu"}


# Runs in a fresh interpreter that never imports layerwise: the saved directory alone must rebuild the model.
RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[2]))
    for arch in sys.argv[3].split(","):
        model = AutoModelForCausalLM.from_pretrained(f"{sys.argv[1]}/{arch}", dtype=torch.float32).eval()
        with torch.inference_mode():
            torch.save(model(input_ids=ids, use_cache=False).logits, f"{sys.argv[1]}/{arch}/reloaded.pt")
    assert not any(name.startswith("layerwise") for name in sys.modules), "the reload imported layerwise"
    """
)


# What each export case removes: layer 1 of every architecture, and both sliding layers of gemma3.
EXPORTS = {**{arch: (arch, [1]) for arch in ARCHS}, "gemma3-full-only": ("gemma3", [0, 2])}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each case of EXPORTS saved with save_pretrained and reloaded by plain transformers (one subprocess
    for all of them, to keep the test fast); per case: (in-process logits, dir)."""
    root = tmp_path_factory.mktemp("removed")
    ids = random_windows(2, 16, seed=2)
    results = {}
    for case, (arch, removed) in EXPORTS.items():
        model = tiny_model(arch, n_layers=4)
        remove_layers(model, removed)
        model.save_pretrained(root / case)
        results[case] = (logits(model, ids), root / case)
    # cwd: a neutral folder, so that `import kernels` (transformers probes the hub's kernels package) cannot
    # find this repository's top-level kernels/ folder, which is layerwise.kernels.
    done = subprocess.run([sys.executable, "-c", RELOAD, str(root), json.dumps(ids.tolist()), ",".join(EXPORTS)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return results


def test_saved_model_reloads_without_layerwise(arch, exported):
    expected, path = exported[arch]
    config = json.loads((path / "config.json").read_text())
    assert config.get("num_hidden_layers", config.get("n_layer")) == 3
    if "layer_types" in config:
        assert len(config["layer_types"]) == 3
    torch.testing.assert_close(torch.load(path / "reloaded.pt"), expected, rtol=0, atol=1e-5)


def test_gemma3_without_sliding_layers_reloads_without_layerwise(exported):
    expected, path = exported["gemma3-full-only"]
    assert json.loads((path / "config.json").read_text())["layer_types"] == ["full_attention"] * 2
    torch.testing.assert_close(torch.load(path / "reloaded.pt"), expected, rtol=0, atol=1e-5)
