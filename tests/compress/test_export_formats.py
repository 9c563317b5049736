"""`layerwise export --format compressed-tensors|quanto`: each export is loaded by that software on CPU in a
process that never imports layerwise, and its logits are compared with layerwise's own loaded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_windows, tiny_model
from export_helpers import (
    TOLERANCE,
    decompressor_body,
    layerwise_logits,
    logits_in_subprocess,
    relative_difference,
)
from transformers import AutoModelForCausalLM, LlamaConfig

import layerwise
from layerwise.cli import main
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerAction, Plan, QuantSpec
from layerwise.output.export import export_checkpoint

IDS = [[(7 * i + 3) % 96 for i in range(24)]]


def quantize(layer, bits, group_size, sym, **kwargs):
    return LayerAction(layer, "quantize", bits=bits, group_size=group_size, method="rtn", sym=sym, **kwargs)


def checkpoint(tmp_path, model, actions, name="ckpt", method="rtn"):
    """`actions` applied with `method` filling those that name none (the `quantize` helper names rtn)."""
    result = layerwise.apply(model, Plan(actions), method, calib=random_windows(8, 32, seed=1), progress=False)
    layerwise.save(result, tmp_path / name)
    return tmp_path / name


def gptq(layer, bits, group_size, sym, **kwargs):
    return LayerAction(layer, "quantize", bits=bits, group_size=group_size, method=None, sym=sym, **kwargs)


def reference_logits(path):
    return layerwise_logits(path, IDS)


def loader_logits(tmp_path, body):
    return logits_in_subprocess(tmp_path, body, IDS)


def tiny(arch, n_layers):
    return tiny_model(arch, n_layers=n_layers)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("three_bit_as_four", [False, True])
def test_compressed_tensors_symmetric_mixed_gptq_loads_in_transformers(arch, three_bit_as_four, tmp_path):
    """A GPTQ plan of 2/3/4/8 bits, a per-module override, a kept and a pruned layer, loaded by transformers'
    from_pretrained; 3-bit packed densely, or on the 4-bit grid when asked."""
    pytest.importorskip("compressed_tensors")
    actions = [
        gptq(0, 4, 32, True),
        gptq(1, 8, 64, True),
        gptq(2, 2, 32, True, overrides={"mlp.down_proj": QuantSpec(3, 64, "gptq", True)}),
        LayerAction(3, "keep"),
        LayerAction(4, "prune"),
        gptq(5, 3, 64, True),  # one group per row for the 64-wide modules: strategy "channel"
    ]
    path = checkpoint(tmp_path, tiny(arch, 6), actions, method="gptq")
    export_checkpoint(path, tmp_path / "ct", "compressed-tensors", three_bit_as_four=three_bit_as_four)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"].values()
    assert {g["weights"]["num_bits"] for g in groups} == ({2, 4, 8} if three_bit_as_four else {2, 3, 4, 8})
    assert config["num_hidden_layers"] == 5
    got = loader_logits(tmp_path, f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ct')!r}, dtype=torch.float32)
    """)
    assert relative_difference(got, reference_logits(path)) < TOLERANCE


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_compressed_tensors_asymmetric_mixed_gptq_loads_in_compressed_tensors(arch, tmp_path):
    """Asymmetric (packed zero points) through compressed-tensors' own ModelCompressor: transformers 5's
    loader builds unpacked zero-point shapes on the meta device and cannot load any asymmetric
    pack-quantized checkpoint (llm-compressor issue 1618), ours included."""
    pytest.importorskip("compressed_tensors")
    actions = [
        gptq(0, 4, 32, False),
        gptq(1, 8, 64, False),
        gptq(2, 2, 32, False, overrides={"mlp.down_proj": QuantSpec(3, 64, "gptq", True)}),
        LayerAction(3, "keep"),
        gptq(4, 3, 32, False),
    ]
    path = checkpoint(tmp_path, tiny(arch, 5), actions, method="gptq")
    export_checkpoint(path, tmp_path / "ct", "compressed-tensors")
    got = loader_logits(tmp_path, decompressor_body(tmp_path / "ct"))
    assert relative_difference(got, reference_logits(path)) < TOLERANCE


def test_compressed_tensors_stores_what_the_budget_counts(tmp_path):
    """On disk, each quantized module's tensors take its `storage_bits` (fp16 scales, zero points packed at
    the code width, dense 3-bit codes), plus the 16-byte weight_shape: the budget is what the export costs."""
    import safetensors.torch

    actions = [quantize(0, 3, 32, False), quantize(1, 2, 64, False), quantize(2, 4, 32, True)]
    path = checkpoint(tmp_path, tiny("llama", 3), actions)
    export_checkpoint(path, tmp_path / "ct", "compressed-tensors")
    stored = safetensors.torch.load_file(tmp_path / "ct" / "model.safetensors")
    model = layerwise.load(path).model
    for name, module in model.named_modules():
        if hasattr(module, "storage_bits"):
            nbytes = sum(t.numel() * t.element_size() for k, t in stored.items()
                         if k.startswith(f"{name}.weight_"))
            assert nbytes == module.storage_bits() // 8 + 16, name


def test_vllm_target_plans_fused_sets_together(tmp_path):
    """`target="vllm"` with `granularity="module"` measures and plans q/k/v and gate/up as one unit each, so the
    checkpoint exports for vLLM, while o_proj and down_proj get options of their own."""
    result = layerwise.compress(tiny("llama", 3), 4.0, options="2:32,4:32,8:32", target="vllm", granularity="module",
                                method="gptq", calib=random_windows(8, 32, seed=1), progress=False, rotate=None)
    assert result.plan.made_by["granularity"] == "fused"
    assert "self_attn.q_proj+self_attn.k_proj+self_attn.v_proj" in result.scores.module_damage[0]
    layerwise.save(result, tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "ct", "compressed-tensors", target="vllm")
    for action in result.plan.layers:
        assert len({action.module_spec(f"self_attn.{p}_proj") for p in "qkv"}) == 1
        assert action.module_spec("mlp.gate_proj") == action.module_spec("mlp.up_proj")


def test_vllm_target_refuses_a_fused_set_with_two_schemes(tmp_path, capsys):
    """vLLM runs q/k/v as one layer with one scheme: an override that gives v_proj its own is refused for
    --target vllm (naming the modules and the fix), and exported without a target."""
    actions = [quantize(0, 4, 32, True, overrides={"self_attn.v_proj": QuantSpec(8, 32, "rtn", True)}),
               quantize(1, 4, 32, True)]
    path = checkpoint(tmp_path, tiny("llama", 2), actions)
    with pytest.raises(LayerwiseError) as info:
        export_checkpoint(path, tmp_path / "out", "compressed-tensors", target="vllm")
    message = str(info.value)
    assert "q_proj, k_proj, v_proj of layer 0: vLLM fuses q/k/v and gate/up" in message
    assert "one spec per fused set (--granularity layer or fused" in message and "layer 1" not in message
    assert not (tmp_path / "out").exists()
    export_checkpoint(path, tmp_path / "out", "compressed-tensors")
    with pytest.raises(SystemExit):
        main(["--quiet", "export", str(path), "--format", "compressed-tensors", "--target", "tpu",
              "--out", str(tmp_path / "x")])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    with pytest.raises(LayerwiseError, match="unknown target 'tpu'; choose one of vllm"):
        export_checkpoint(path, tmp_path / "x", "compressed-tensors", target="tpu")


def quanto_model():
    # Input widths 256 and 384: quanto groups qint4 / qint2 weights by 128 there.
    config = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=384, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_quanto_mixed_loads_in_optimum_quanto(tmp_path):
    """First qint4 / qint2 use on CPU compiles quanto's C++ unpack extension (about 75 s, cached after)."""
    pytest.importorskip("optimum.quanto")
    actions = [
        quantize(0, 4, 128, False),
        quantize(1, 8, 512, True),  # qint8: one symmetric group per row
        quantize(2, 2, 128, True, overrides={"mlp.down_proj": QuantSpec(3, 512, "rtn", False)}),
        LayerAction(3, "keep"),
        LayerAction(4, "prune"),
        quantize(5, 4, 256, True),  # our group of 256 repeats its scale over two of quanto's groups of 128
    ]
    path = checkpoint(tmp_path, quanto_model(), actions)
    export_checkpoint(path, tmp_path / "q", "quanto")
    qmap = json.loads((tmp_path / "q" / "quanto_qmap.json").read_text())
    assert {v["weights"] for v in qmap.values()} == {"qint2", "qint4", "qint8"}
    got = loader_logits(tmp_path, f"""
        from optimum.quanto import QuantizedModelForCausalLM
        model = QuantizedModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})
    """)
    assert relative_difference(got, reference_logits(path)) < TOLERANCE


@pytest.mark.parametrize("fmt", ["compressed-tensors", "quanto"])
def test_tied_and_dropped_layers_are_refused(fmt, tmp_path):
    model = tiny("llama", 4)
    actions = [quantize(0, 4, 32, True), LayerAction(1, "tie", tie_to=0),
               quantize(2, 4, 32, True, drop=["attn"]), LayerAction(3, "keep")]
    result = layerwise.apply(model, Plan(actions), "rtn", progress=False)
    layerwise.save(result, tmp_path / "ckpt")
    with pytest.raises(LayerwiseError, match=r"layer 1 is tied.*layer 2 has dropped sub-layers.*layerwise"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_quanto_refuses_groups_it_cannot_hold(tmp_path):
    path = checkpoint(tmp_path, quanto_model(), [quantize(i, 4, 64, True) for i in range(5)] +
                      [quantize(5, 8, 128, False)])
    with pytest.raises(LayerwiseError) as info:
        export_checkpoint(path, tmp_path / "out", "quanto")
    message = str(info.value)
    # Summarised by module and layers, with a fix that names the group quanto needs for that width ...
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj of layers 0-4: group 64 is not a multiple of " \
           "quanto's group 128 for 256-wide inputs" in message
    assert "Compress again with the groups quanto uses (128 for 256-wide inputs, 128 for 384-wide inputs)" in message
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj of layer 5: 8-bit with groups" in message
    assert "model.layers.0.self_attn.q_proj" not in message and len(message) < 1000
    # ... and every module by its full name in the details that --verbose prints.
    assert "model.layers.0.self_attn.q_proj: group 64 is not a multiple of quanto's group 128 for 256-wide " \
           "inputs" in info.value.details
    assert len(info.value.details) == 6 * 7
    assert not (tmp_path / "out").exists()


def test_a_group_that_does_not_divide_the_width_is_fitted_and_exports(tmp_path):
    """Group 96 on 64- and 128-wide inputs: 64-wide modules take one group per row, down_proj (128 wide) 64."""
    path = checkpoint(tmp_path, tiny("llama", 2), [quantize(0, 4, 96, True), LayerAction(1, "keep")])
    layer = layerwise.load(path).model.model.layers[0]
    assert layer.mlp.down_proj.group_size == 64 and layer.self_attn.q_proj.group_size == 96
    assert layer.self_attn.q_proj.scales.shape[1] == 1
    export_checkpoint(path, tmp_path / "ct", "compressed-tensors")
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    schemes = {(g["weights"]["strategy"], g["weights"]["group_size"]) for g in groups.values()}
    assert schemes == {("channel", None), ("group", 64)}


def test_compressed_tensors_refuses_a_version_1_short_last_group(tmp_path, capsys):
    """tests/data/checkpoint-v1 (written before group sizes were fitted): group 48 on 64-wide inputs."""
    path = Path(__file__).resolve().parents[1] / "data" / "checkpoint-v1"
    with pytest.raises(LayerwiseError) as info:
        export_checkpoint(path, tmp_path / "out", "compressed-tensors")
    message = str(info.value)
    assert "of layers 0-3: group 48 does not divide the 64-wide input" in message
    assert "(group 48 -> 32 for 64-wide inputs)" in message and "--verbose" in message
    assert not (tmp_path / "out").exists()
    assert main(["--quiet", "export", str(path), "--format", "compressed-tensors", "--out", str(tmp_path / "out"),
                 "--verbose"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("layerwise: error: checkpoint") and len(err) == 1 + len(info.value.details)
    assert "  model.layers.0.self_attn.q_proj: group 48 does not divide the 64-wide input" in err[1]


@pytest.mark.parametrize("fmt", ["compressed-tensors", "quanto"])
def test_bitsandbytes_layers_are_refused(fmt, tmp_path):
    pytest.importorskip("bitsandbytes")
    path = checkpoint(tmp_path, tiny("llama", 2),
                      [LayerAction(0, "quantize", bits=4, group_size=64, method="nf4"), LayerAction(1, "keep")])
    with pytest.raises(LayerwiseError, match=r"layer 0 \(nf4\) use bitsandbytes formats"):
        export_checkpoint(path, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["compressed-tensors", "quanto"])
def test_modules_that_are_not_linear_in_transformers_are_refused(fmt, tmp_path):
    path = checkpoint(tmp_path, tiny("gpt2", 2), [quantize(0, 4, 32, True), LayerAction(1, "keep")])
    with pytest.raises(LayerwiseError, match=r"c_attn.* of layer 0: not nn\.Linear in transformers"):
        export_checkpoint(path, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_cli_export_formats(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    path = checkpoint(tmp_path, tiny("llama", 2), [quantize(0, 4, 32, True), quantize(1, 8, 32, False)])
    assert main(["--quiet", "export", str(path), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    assert (tmp_path / "ct" / "model.safetensors").is_file() and not (tmp_path / "ct" / "layerwise.json").exists()
    assert main(["--quiet", "export", str(path), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["--quiet", "export", str(path), "--format", "compressed-tensors", "--out", str(tmp_path / "ct"),
                 "--overwrite"]) == 0
    assert main(["--quiet", "export", str(path), "--format", "quanto", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported as an optimum-quanto model" in err and "compressed-tensors" in err
    assert not (tmp_path / "q").exists()
    assert not list(tmp_path.glob(".q.tmp-*")) and not list(tmp_path.glob(".ct.tmp-*"))
