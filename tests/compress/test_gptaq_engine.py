"""GPTAQ through the engine: the full-precision stream carried beside the quantized one, in memory, streamed
from disk and resumed; the same bytes either way, GPTQ's where the two streams still agree."""

from __future__ import annotations

import copy
import functools
import re

import pytest
import safetensors.torch
import torch
from conftest import interrupt_streaming_at, random_windows, record_quantized_loads, tiny_model, tiny_tokenizer

import layerwise
from layerwise.cli import main
from layerwise.engine.applier import apply_plan, plan_needs_reference
from layerwise.engine.streaming import WorkDir, partial_dir
from layerwise.model.adapter import layer_linear_shapes
from layerwise.model.driver import stream_layers
from layerwise.model.placement import Placement
from layerwise.planning.planners import uniform_plan
from layerwise.quant import QuantLinear

WINDOWS = random_windows(6, 24)  # 144 tokens: full-rank Hessians for the 128 MLP inputs
# rotate=None: streaming cannot rotate, and these tests compare streamed runs with in-memory ones.
KWARGS = dict(uniform=3, method="gptaq", group_size=32, calib=WINDOWS, progress=False, rotate=None)


@functools.cache
def _tokenizer():
    return tiny_tokenizer()


def saved_model(tmp_path, arch: str, n_layers: int = 3):
    model = tiny_model(arch, n_layers=n_layers).to(torch.bfloat16)
    path = tmp_path / f"{arch}-src"
    model.save_pretrained(path, max_shard_size="40KB")
    _tokenizer().save_pretrained(path)
    return path


def tensors(ckpt) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(ckpt / "model.safetensors")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_in_memory_and_streamed_write_the_same_bytes_and_layer_0_is_gptq(tmp_path, arch):
    path = saved_model(tmp_path, arch)
    layerwise.save(layerwise.compress(str(path), stream=False, **KWARGS), str(tmp_path / "mem"))
    result = layerwise.compress(str(path), stream=True, out=str(tmp_path / "st"), **KWARGS)
    assert result.report.metrics["streamed"] and not partial_dir(tmp_path / "st").exists()
    assert (tmp_path / "mem" / "model.safetensors").read_bytes() == (tmp_path / "st" / "model.safetensors").read_bytes()
    logits = layerwise.load(tmp_path / "st").model(input_ids=WINDOWS[:2]).logits
    assert torch.isfinite(logits).all()
    # Layer 0's inputs are the same in both streams: no cross term, GPTQ's codes. Later layers differ.
    layerwise.compress(str(path), stream=True, out=str(tmp_path / "gptq"), **{**KWARGS, "method": "gptq"})
    asym, plain = tensors(tmp_path / "st"), tensors(tmp_path / "gptq")
    assert asym.keys() == plain.keys()
    qweights = [k for k in asym if k.endswith(".qweight")]
    assert all(torch.equal(asym[k], plain[k]) for k in qweights if ".layers.0." in k)
    assert not any(torch.equal(asym[k], plain[k]) for k in qweights if ".layers.2." in k)


def test_the_reference_stream_is_the_float_models_and_placement_changes_nothing():
    """Each step's reference outputs are the float model's layer outputs, exactly; the quantized stream is
    not. A CPU float32 placement with offloaded activations takes the Activations path to the same codes."""
    model = tiny_model("llama", n_layers=3)
    float_model = copy.deepcopy(model)
    placed = copy.deepcopy(model)
    expected = [step.run() for step in stream_layers(float_model, WINDOWS, batch_size=2, progress=False)]
    plan = uniform_plan(layer_linear_shapes(model), 3, 32, method="gptaq")
    assert plan_needs_reference(plan, "rtn")
    assert not plan_needs_reference(uniform_plan(layer_linear_shapes(model), 3, 32, method="gptq"), "gptaq")
    seen = []

    def on_layer(step, outcome):
        seen.append(step.index)
        assert all(torch.equal(a, b) for a, b in zip(step.reference_outputs, expected[step.index], strict=True))
        if step.index > 0:
            assert not torch.equal(step.outputs[0], expected[step.index][0])

    apply_plan(model, plan, "rtn", windows=WINDOWS, batch_size=2, progress=False, on_layer=on_layer)
    assert seen == [0, 1, 2]
    apply_plan(placed, plan, "rtn", windows=WINDOWS, batch_size=2, progress=False,
               placement=Placement("cpu", torch.float32, offload_activations=True))
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 21
    for name, module in placed.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(module.qweight, quantized[name].qweight)


def test_an_interrupted_streamed_run_resumes_from_both_saved_streams(tmp_path, monkeypatch):
    path = saved_model(tmp_path, "llama", n_layers=4)
    layerwise.compress(str(path), stream=True, out=str(tmp_path / "whole"), **KWARGS)
    interrupt_streaming_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        layerwise.compress(str(path), stream=True, out=str(tmp_path / "ckpt"), **KWARGS)
    work = WorkDir(tmp_path / "ckpt")
    assert work.hidden_file(2).is_file() and work.reference_file(2).is_file()
    assert not work.reference_file(1).exists()
    assert work.resume_point(4, calibrated=True, reference=True) == 2
    saved = work.reference_file(2).read_bytes()
    work.reference_file(2).unlink()  # without the float stream's inputs layer 2 cannot resume: start over
    assert work.resume_point(4, calibrated=True, reference=True) == 0
    assert work.resume_point(4, calibrated=True) == 2
    work.reference_file(2).write_bytes(saved)
    loaded = record_quantized_loads(monkeypatch)
    layerwise.compress(str(path), stream=True, resume=True, out=str(tmp_path / "ckpt"), **KWARGS)
    assert loaded == [2, 3]
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_the_cli_offers_it_and_sensitivity_scores_its_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    assert re.search(r"quantization method: [^\n]*\bgptaq\b", capsys.readouterr().out)
    path = saved_model(tmp_path, "llama", n_layers=2)
    result = layerwise.compress(str(path), bits=3.5, options="2:32,4:32", method="gptaq", calib=WINDOWS,
                                progress=False, out=str(tmp_path / "opt"))
    assert {a.method for a in result.plan.layers} == {"gptaq"}
    assert set(result.scores.option_damage) == {"2:32:gptaq", "4:32:gptaq"}
    logits = layerwise.load(tmp_path / "opt").model(input_ids=WINDOWS[:1]).logits
    assert torch.isfinite(logits).all()
