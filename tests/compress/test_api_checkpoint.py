import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import random_windows, tiny_model

import layerwise
from layerwise.core.errors import LayerwiseError
from layerwise.model.adapter import decoder_layers, linear_modules
from layerwise.quant import QuantLinear


def compressed(arch="llama", bits=3.0, **kwargs):
    model = tiny_model(arch, n_layers=4)
    kwargs = {"scorer": "lim", "method": "rtn", **kwargs}  # the seed's path; tests of the defaults are elsewhere
    return layerwise.compress(model, bits, calib=random_windows(2, 16), group_size=32, progress=False, **kwargs)


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_compress_save_load_gives_identical_logits(arch, tmp_path):
    result = compressed(arch)
    ids = random_windows(1, 12, seed=5)
    before = logits(result.model, ids)
    layerwise.save(result, tmp_path / "ckpt")
    ckpt = layerwise.load(tmp_path / "ckpt")
    assert torch.equal(logits(ckpt.model, ids), before)
    assert ckpt.plan.bits_per_layer() == result.plan.bits_per_layer()
    meta = json.loads((tmp_path / "ckpt" / "layerwise.json").read_text())
    assert meta["format_version"] == 2 and meta["plan"]["avg_bits"] <= 3.0
    assert meta["report"]["avg_bits"] == pytest.approx(result.plan.avg_bits)
    assert len(meta["scores"]["scores"]) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_plan_bits_reach_every_module():
    result = compressed(bits=4.0, high=4, low=2)  # group 32: 2-bit costs 3 bits, 4-bit costs 5
    for bits, layer in zip(result.plan.bits_per_layer(), decoder_layers(result.model), strict=True):
        modules = linear_modules(layer).values()
        assert modules and all(isinstance(m, QuantLinear) and m.bits == bits for m in modules)
    assert sorted(set(result.plan.bits_per_layer())) == [2, 4]
    assert result.report.avg_bits <= 4.0
    assert all(row.rel_error is not None and 0 < row.rel_error < 1 for row in result.report.rows)
    assert "average bits per decoder weight" in result.report.to_text()


def test_quantized_model_is_close_to_original_at_8_bits():
    model = tiny_model("llama", n_layers=4)
    ids = random_windows(1, 12, seed=3)
    reference = logits(model, ids)
    # 8-bit group 32 costs 8 + (16 + 8) / 32 = 8.75 bits: a budget of 8.75 puts every layer there.
    result = layerwise.compress(model, 8.75, scorer="lim", method="rtn", high=8, low=4, calib=random_windows(2, 16),
                                group_size=32,
                                progress=False)
    assert all(b == 8 for b in result.plan.bits_per_layer())
    rel = (logits(result.model, ids) - reference).norm() / reference.norm()
    assert rel < 0.02


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    result = compressed()
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LayerwiseError, match="already exists.*--overwrite"):
        layerwise.save(result, out)
    assert (out / "keep.txt").read_text() == "mine"
    layerwise.save(result, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "layerwise.json").exists()


@pytest.fixture
def saved(tmp_path):
    layerwise.save(compressed(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_and_misshapen_tensors_are_named(saved):
    weights = saved / "model.safetensors"
    state = safetensors.torch.load_file(weights)
    name = next(k for k in state if k.endswith("qweight"))
    state.pop(name)
    safetensors.torch.save_file(state, weights)
    with pytest.raises(LayerwiseError, match=f"tensor {name} is missing"):
        layerwise.load(saved)
    state[name] = torch.zeros(3, 3, dtype=torch.int32)
    safetensors.torch.save_file(state, weights)
    with pytest.raises(LayerwiseError, match=f"tensor {name} has shape"):
        layerwise.load(saved)


def test_unknown_format_version_and_damaged_files(saved):
    meta_path = saved / "layerwise.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(LayerwiseError, match="version 99 is unknown"):
        layerwise.load(saved)
    meta_path.write_text(json.dumps(meta))
    (saved / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LayerwiseError, match="model.safetensors cannot be read"):
        layerwise.load(saved)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(LayerwiseError, match="does not exist"):
        layerwise.load(tmp_path / "nothing")
    with pytest.raises(LayerwiseError, match="not a layerwise checkpoint"):
        layerwise.load(tmp_path)


def test_plan_with_wrong_layer_count_is_refused():
    result = compressed()
    model = tiny_model("llama", n_layers=3)
    with pytest.raises(LayerwiseError, match="plan covers 4 layers but the model has 3"):
        layerwise.apply(model, result.plan, "rtn", progress=False)


def test_unknown_names_are_refused_before_work():
    model = tiny_model("llama", n_layers=2)
    for kwargs, match in [({"scorer": "x"}, "unknown scorer"), ({"method": "x"}, "unknown quantization method"),
                          ({"planner": "x"}, "unknown planner")]:
        with pytest.raises(LayerwiseError, match=match):
            layerwise.compress(model, 3.0, calib=random_windows(1, 8), progress=False, **kwargs)


def test_not_a_causal_lm_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64))
    with pytest.raises(LayerwiseError, match="decoder-only"):
        layerwise.compress(t5, 3.0, calib=random_windows(1, 8), progress=False)


def test_encoder_model_object_is_refused():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=64))
    with pytest.raises(LayerwiseError, match="decoder-only"):
        layerwise.compress(bert, 3.0, calib=random_windows(1, 8), progress=False)


def test_a_version_1_checkpoint_loads_with_its_weights():
    """tests/data/checkpoint-v1 was written by layerwise before checkpoint format 2 (fp16 zero points, group 48
    on 64-wide inputs: a short last group), with the logits it gave then; it loads and gives them still."""
    data = Path(__file__).resolve().parents[1] / "data"
    ckpt = layerwise.load(data / "checkpoint-v1")
    assert ckpt.meta["format_version"] == 1
    q_proj = ckpt.model.model.layers[0].self_attn.q_proj
    assert q_proj.group_size == 48 and q_proj.scales.shape == (64, 2) and q_proj.zeros.dtype == torch.int32
    with torch.inference_mode():
        logits = ckpt.model(random_windows(2, 16, seed=9)).logits
    assert torch.equal(logits, torch.load(data / "checkpoint-v1-logits.pt"))
