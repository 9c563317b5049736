"""Pruning, dropping and tying through compress(), the checkpoint, `export`, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors
import torch
from conftest import random_windows, tiny_model

import layerwise
from layerwise.cli import main
from layerwise.core.errors import LayerwiseError
from layerwise.model.adapter import decoder_layers, linear_modules
from layerwise.output.export import export_checkpoint
from layerwise.quant import QuantLinear

CALIB = ["--calib", "pydoc", "--calib-windows", "4", "--calib-len", "32"]


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def generate(model, ids, use_cache):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)


def restructured(arch, **kwargs):
    model = tiny_model(arch, n_layers=5)
    kwargs = {"bits": None, "method": "rtn", "group_size": 32, "prune_scorer": "lim", **kwargs}
    return layerwise.compress(model, calib=random_windows(3, 16), progress=False, **kwargs)


def tensor_names(path):
    with safetensors.safe_open(path / "model.safetensors", "pt") as f:
        return set(f.keys())


def test_prune_drop_tie_quantize_round_trip(arch, tmp_path):
    result = restructured(arch, prune=1, drop_attn=1, drop_mlp=1, tie=1, uniform=4)
    plan = result.plan
    assert plan.n_layers == 5 and len(decoder_layers(result.model)) == 4
    assert [a.action for a in plan.layers].count("prune") == 1
    tied = [a for a in plan.layers if a.action == "tie"]
    assert len(tied) == 1
    assert sum(len(a.drop) for a in plan.layers) == 2
    kept = plan.kept_layers()
    new_index = {old: new for new, old in enumerate(kept)}
    layers = decoder_layers(result.model)
    tied_layer, representative = layers[new_index[tied[0].layer]], layers[new_index[tied[0].tie_to]]
    for name, module in linear_modules(tied_layer).items():
        assert isinstance(module, QuantLinear) and module is linear_modules(representative)[name]
    ids = random_windows(1, 10, seed=4)
    assert torch.equal(generate(result.model, ids, True), generate(result.model, ids, False))
    layerwise.save(result, tmp_path / "ckpt")
    names = tensor_names(tmp_path / "ckpt")
    assert not any(n.startswith(f"{_prefix(result.model)}.{new_index[tied[0].layer]}.") for n in names)
    ckpt = layerwise.load(tmp_path / "ckpt")
    assert torch.equal(logits(ckpt.model, ids), logits(result.model, ids))
    assert ckpt.plan.to_dict() == plan.to_dict()
    with pytest.raises(LayerwiseError, match="quantized.*tied.*dropped sub-layers"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def _prefix(model):
    from layerwise.model.adapter import layers_path

    return layers_path(model)


def test_budget_counts_the_original_weights(tmp_path):
    result = restructured("llama", prune=2, bits=5.5, scorer="lim", high=8, low=4)
    # Pruning 2 of 5 layers frees their bits: the 3 left take 8 bits (9 with group-32 overhead) within 5.5.
    assert result.plan.avg_bits <= 5.5
    assert {a.bits for a in result.plan.layers if a.action == "quantize"} == {8}
    assert result.report.avg_bits == pytest.approx(result.plan.avg_bits)
    assert [r.action for r in result.report.rows].count("prune") == 2


def test_tie_average_mode_writes_the_mean(tmp_path):
    model = tiny_model("llama", n_layers=5)
    weights = [decoder_layers(model)[i].mlp.up_proj.weight.detach().clone() for i in range(5)]
    result = layerwise.compress(model, bits=None, tie=1, tie_mode="average", calib=random_windows(3, 16),
                                progress=False)
    tie = next(a for a in result.plan.layers if a.action == "tie")
    layer = decoder_layers(result.model)[tie.tie_to]
    assert torch.allclose(layer.mlp.up_proj.weight, (weights[tie.tie_to] + weights[tie.layer]) / 2)


def test_pruned_only_exports_to_plain_hf(tmp_path):
    result = restructured("llama", prune=2)
    layerwise.save(result, tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    ids = random_windows(1, 10, seed=2)
    torch.save(ids, tmp_path / "ids.pt")
    expected = logits(result.model, ids)
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r})\n"
        "assert 'layerwise' not in sys.modules\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"torch.save(m(input_ids=ids).logits.detach(), {str(tmp_path / 'out.pt')!r})\n"
    )
    # Not from the repository root: its kernels/ folder would shadow the `kernels` package transformers probes.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expected, atol=1e-5)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert not (tmp_path / "hf" / "layerwise.json").exists()


def test_plan_for_the_unpruned_model_is_refused_on_the_pruned_one(tmp_path):
    result = restructured("llama", prune=1)
    plan = layerwise.Plan([layerwise.LayerAction(i, "quantize", 4, 32) for i in range(5)])
    with pytest.raises(LayerwiseError, match="plan covers 5 layers but the model has 4"):
        layerwise.apply(result.model, plan)


def test_tying_layers_of_different_shapes_is_refused():
    model = tiny_model("llama", n_layers=3)
    decoder_layers(model)[2].mlp.up_proj = torch.nn.Linear(64, 96, bias=False)
    layers = [layerwise.LayerAction(0, "keep"), layerwise.LayerAction(1, "keep"),
              layerwise.LayerAction(2, "tie", tie_to=1)]
    with pytest.raises(LayerwiseError, match="tying layers of different shapes"):
        layerwise.apply(model, layerwise.Plan(layers))
    assert len(decoder_layers(model)) == 3


def run(*argv, capsys):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prune_then_export(tiny_model_dir, tmp_path, capsys):
    code, out, err = run("compress", tiny_model_dir, "--prune", 1, "--scorer", "angular", "--out", tmp_path / "c",
                         *CALIB, capsys=capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "c" / "layerwise.json").read_text())
    assert [a["action"] for a in meta["plan"]["layers"]].count("prune") == 1
    assert meta["plan"]["made_by"]["structure_scorers"] == {"prune": "angular"}
    code, out, err = run("export", tmp_path / "c", "--format", "hf", "--out", tmp_path / "hf", capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "{model}", "--prune", "4", "--out", "{tmp}/c"], "at least one must stay"),
        # --prune -1 is refused by the argument parser (test_cli.py checks the one-line message)
        (["compress", "{model}", "--prune", "6", "--prune-block", "--out", "{tmp}/c"], "cannot prune 6 of 4 layers"),
        (["compress", "{model}", "--drop-attn", "4", "--out", "{tmp}/c"], "keep its attention"),
        (["compress", "{model}", "--prune", "1", "--scorer", "nope", "--out", "{tmp}/c"], "unknown scorer"),
        (["compress", "{model}", "--prune", "2", "--prune-block", "--scorer", "lim", "--out", "{tmp}/c"],
         "use --scorer angular"),
        (["export", "{tmp}/quantized", "--out", "{tmp}/hf"], "cannot be exported as a plain Hugging Face model"),
        (["export", "{tmp}/missing", "--out", "{tmp}/hf"], "does not exist"),
    ],
)
def test_bad_structural_input_is_refused(argv, message, tiny_model_dir, tmp_path_factory, capsys):
    quantized = tmp_path_factory.getbasetemp() / "quantized"
    if not quantized.exists():
        assert main(["--quiet", "compress", str(tiny_model_dir), "--uniform", "4", "--method", "rtn",
                     "--group-size", "32", "--out", str(quantized)]) == 0
    tmp = tmp_path_factory.mktemp("bad")
    before = sorted(p.name for p in tmp.iterdir())
    argv = [a.format(tmp=tmp, model=tiny_model_dir).replace(f"{tmp}/quantized", str(quantized)) for a in argv]
    code, _, err = run(*argv, *(CALIB if argv[0] == "compress" else []), capsys=capsys)
    assert code == 2
    assert message in err
    assert err.startswith("layerwise: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp.iterdir()) == before


def test_a_planner_argument_is_refused_before_the_structure_is_scored(monkeypatch):
    """A setting the planner does not take (group_size for `optimal`, the planner of the sensitivity scores that
    allocate the layers left after pruning) is refused before any scorer runs, not after the structure and the
    layers are scored."""
    import layerwise.engine.pipeline as pipeline

    def no_scoring(*args, **kwargs):
        raise AssertionError("a scorer ran before the refusal")

    monkeypatch.setattr(pipeline, "score_model", no_scoring)
    with pytest.raises(LayerwiseError, match=r"planner 'optimal' does not take group_size \(it takes: bits"):
        layerwise.compress(tiny_model("llama", n_layers=5), 3.25, prune=1, prune_scorer="lim", method="rtn",
                           group_size=32, calib=random_windows(3, 16), progress=False)
