"""`layerwise export --format compressed-tensors|quanto`: each export is loaded by that software on CPU in a
process that never imports layerwise, and its logits are compared with layerwise's own loaded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

import layerwise
from layerwise.cli import main
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerAction, Plan, QuantSpec
from layerwise.output.export import export_checkpoint

TOLERANCE = 1e-3  # max |logit difference| / max |logit|
IDS = [[(7 * i + 3) % 96 for i in range(24)]]


def quantize(layer, bits, group_size, sym, **kwargs):
    return LayerAction(layer, "quantize", bits=bits, group_size=group_size, method="rtn", sym=sym, **kwargs)


def checkpoint(tmp_path, model, actions, name="ckpt"):
    result = layerwise.apply(model, Plan(actions), "rtn", progress=False)
    layerwise.save(result, tmp_path / name)
    return tmp_path / name


def reference_logits(path):
    with torch.inference_mode():
        return layerwise.load(path).model(input_ids=torch.tensor(IDS)).logits


def loader_logits(tmp_path, body):
    """Run `body` (which sets `model`) in a fresh interpreter without layerwise; return its logits."""
    script = "import sys, torch\n" + textwrap.dedent(body) + textwrap.dedent(f"""
        assert "layerwise" not in sys.modules
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({IDS})).logits
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
    """)
    # Not from the repository root: its kernels/ folder would shadow the `kernels` package transformers probes.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt")


def relative_difference(got, expected):
    difference = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"max |logit difference| / max |logit| = {difference:.3g}")  # shown with pytest -s
    return difference


def tiny(arch, n_layers):
    return tiny_model(arch, n_layers=n_layers)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compressed_tensors_symmetric_mixed_loads_in_transformers(arch, tmp_path):
    pytest.importorskip("compressed_tensors")
    actions = [
        quantize(0, 4, 32, True),
        quantize(1, 8, 64, True),
        quantize(2, 2, 32, True, overrides={"mlp.down_proj": QuantSpec(3, 64, "rtn", True)}),
        LayerAction(3, "keep"),
        LayerAction(4, "prune"),
        quantize(5, 3, 64, True),  # one group per row for the 64-wide modules: strategy "channel"
    ]
    path = checkpoint(tmp_path, tiny(arch, 6), actions)
    export_checkpoint(path, tmp_path / "ct", "compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"].values()
    assert {g["weights"]["num_bits"] for g in groups} == {2, 4, 8}  # 3-bit codes on the 4-bit grid
    assert config["num_hidden_layers"] == 5
    got = loader_logits(tmp_path, f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ct')!r}, dtype=torch.float32)
    """)
    assert relative_difference(got, reference_logits(path)) < TOLERANCE


def test_compressed_tensors_asymmetric_mixed_loads_in_compressed_tensors(tmp_path):
    """Asymmetric (packed zero points) through compressed-tensors' own ModelCompressor: transformers 5's
    loader builds unpacked zero-point shapes on the meta device and cannot load any asymmetric
    pack-quantized checkpoint (llm-compressor issue 1618), ours included."""
    pytest.importorskip("compressed_tensors")
    actions = [
        quantize(0, 4, 32, False),
        quantize(1, 8, 64, False),
        quantize(2, 2, 32, False, overrides={"mlp.down_proj": QuantSpec(3, 64, "rtn", True)}),
        LayerAction(3, "keep"),
        quantize(4, 3, 32, False),
    ]
    path = checkpoint(tmp_path, tiny("llama", 5), actions)
    export_checkpoint(path, tmp_path / "ct", "compressed-tensors")
    got = loader_logits(tmp_path, f"""
        import json, safetensors.torch
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
        from transformers import AutoConfig, AutoModelForCausalLM
        directory = {str(tmp_path / 'ct')!r}
        config = AutoConfig.from_pretrained(directory)
        qconfig = QuantizationConfig.model_validate(config.quantization_config)
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        compressor = ModelCompressor(quantization_config=qconfig)
        apply_quantization_config(model, qconfig)
        compressor.compress_model(model)  # the compressed layout: packed weights and zero points
        result = model.load_state_dict(safetensors.torch.load_file(directory + "/model.safetensors"), strict=False)
        assert not result.missing_keys and not result.unexpected_keys, result
        compressor.decompress_model(model)
    """)
    assert relative_difference(got, reference_logits(path)) < TOLERANCE


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
    with pytest.raises(LayerwiseError, match=r"layers \[1\] are tied.*layers \[2\] have dropped sub-layers.*layerwise"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_quanto_refuses_groups_it_cannot_hold(tmp_path):
    path = checkpoint(tmp_path, quanto_model(), [quantize(i, 4, 64, True) for i in range(5)] +
                      [quantize(5, 8, 128, False)])
    with pytest.raises(LayerwiseError) as info:
        export_checkpoint(path, tmp_path / "out", "quanto")
    message = str(info.value)
    assert "group size 64, not a multiple of quanto's 128" in message
    assert "model.layers.0.self_attn.q_proj" in message
    assert "model.layers.5.mlp.down_proj" in message and "8-bit with groups or zero points" in message
    assert "group size 128" in message  # the fix
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_refuses_a_short_last_group(tmp_path):
    # down_proj's input width 128 is not a multiple of 96: its last group would be shorter.
    path = checkpoint(tmp_path, tiny("llama", 2), [quantize(0, 4, 96, True), LayerAction(1, "keep")])
    with pytest.raises(LayerwiseError, match=r"model.layers.0.mlp.down_proj.*shorter than the group size.*divides"):
        export_checkpoint(path, tmp_path / "out", "compressed-tensors")
    assert not (tmp_path / "out").exists()


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
    with pytest.raises(LayerwiseError, match=r"transformer\.h\.0\.attn\.c_attn.* are not nn\.Linear in transformers"):
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
