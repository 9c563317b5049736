"""`--rotate` / `rotate=` through the pipeline: the checkpoint says what was applied and loads back to the
same logits, CLI and API write the same bytes, runs without it are unchanged, what cannot rotate is refused
before any work, and rotated checkpoints export."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import random_windows, tiny_config, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import layerwise
from layerwise.cli import main
from layerwise.core.errors import LayerwiseError
from layerwise.model.adapter import decoder_layers
from layerwise.output.export import export_checkpoint

CALIB = dict(calib="pydoc", calib_windows=4, calib_len=32)
CALIB_FLAGS = ["--calib", "pydoc", "--calib-windows", "4", "--calib-len", "32"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    """A tiny llama with tied embeddings (as SmolLM2) and non-uniform norm scales, saved with a tokenizer."""
    tokenizer = tiny_tokenizer()
    config = tiny_config("llama")
    config.vocab_size, config.tie_word_embeddings = len(tokenizer), True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.25, 2.0)
    path = tmp_path_factory.mktemp("tied-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_cli_and_api_write_the_same_rotated_checkpoint(tied_model_dir, tmp_path, method, capsys):
    ids = random_windows(2, 16, seed=2)
    api_out, cli_out = tmp_path / "api", tmp_path / "cli"
    result = layerwise.compress(str(tied_model_dir), uniform=4, method=method, group_size=32, rotate="hadamard",
                                out=str(api_out), progress=False, **CALIB)
    in_memory = logits(result.model, ids)
    assert main(["--quiet", "compress", str(tied_model_dir), "--uniform", "4", "--method", method, "--group-size",
                 "32", "--rotate", "hadamard", *CALIB_FLAGS, "--out", str(cli_out)]) == 0
    assert "rotation: hadamard seed 0" in capsys.readouterr().out
    assert (api_out / "model.safetensors").read_bytes() == (cli_out / "model.safetensors").read_bytes()
    ckpt = layerwise.load(cli_out)
    assert torch.equal(logits(ckpt.model, ids), in_memory)
    assert ckpt.model.lm_head.weight is not ckpt.model.model.embed_tokens.weight  # untied, and stays so
    meta = json.loads((cli_out / "layerwise.json").read_text())
    rotation = meta["rotation"]
    assert rotation["stages"] == ["r1", "r2"] and rotation["untied_head"] and rotation["folded_norms"]
    assert rotation["r1"]["size"] == 64 and rotation["r2"]["size"] == 16
    assert meta["recipe"]["rotate"] == "hadamard" and "rotate" in meta["report"]["metrics"]["phase_seconds"]
    assert meta["report"]["metrics"]["rotation"].startswith("hadamard seed 0")


def test_rotation_keeps_the_float_model_and_reloads(tied_model_dir, tmp_path):
    """Rotation alone (no budget): the checkpoint holds the rotated float model, with the original's logits,
    and exports as a plain HF model that transformers loads with the same logits."""
    ids = random_windows(2, 16, seed=3)
    original = AutoModelForCausalLM.from_pretrained(tied_model_dir, dtype=torch.float32).eval()
    reference = logits(original, ids)
    result = layerwise.compress(str(tied_model_dir), bits=None, rotate="hadamard", out=str(tmp_path / "ckpt"),
                                progress=False)
    assert ((logits(result.model, ids) - reference).abs().max() / reference.abs().max()).item() < TOLERANCE
    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf", "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert exported.lm_head.weight is not exported.model.embed_tokens.weight
    assert torch.equal(logits(exported, ids), logits(layerwise.load(tmp_path / "ckpt").model, ids))


def test_rotated_quantized_checkpoint_exports_as_compressed_tensors(tied_model_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    ids = random_windows(1, 16, seed=4)
    layerwise.compress(str(tied_model_dir), uniform=4, method="rtn", group_size=32, sym=True, rotate="hadamard",
                       out=str(tmp_path / "ckpt"), progress=False, **CALIB)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "ct", "compressed-tensors")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    expected = logits(layerwise.load(tmp_path / "ckpt").model, ids)
    assert ((logits(exported, ids) - expected).abs().max() / expected.abs().max()).item() < 1e-3


def test_without_rotate_nothing_changes_in_the_metadata(tmp_path):
    layerwise.compress(tiny_model("llama"), uniform=4, method="rtn", group_size=32, out=str(tmp_path / "c"),
                       progress=False)
    meta = json.loads((tmp_path / "c" / "layerwise.json").read_text())
    assert "rotation" not in meta and "rotate" not in meta["recipe"]
    assert "rotate" not in meta["report"]["metrics"]["phase_seconds"]


def test_apply_rotates_before_quantizing():
    from layerwise.core.types import LayerAction, Plan

    model = tiny_model("qwen2")
    result = layerwise.apply(model, Plan([LayerAction(i, "quantize", 8, 32) for i in range(4)]), "rtn",
                             rotate="hadamard:r2", progress=False)
    assert result.rotation is not None and result.rotation.stages == ("r2",)


def test_streaming_refuses_rotation(tied_model_dir, tmp_path):
    with pytest.raises(LayerwiseError, match="cannot rotate yet"):
        layerwise.compress(str(tied_model_dir), uniform=4, method="rtn", rotate="hadamard", stream=True,
                           out=str(tmp_path / "c"), progress=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--rotate", "hadamard"], "sandwich norms"),
    (["--rotate", "spin"], "unknown rotation 'spin'"),
    (["--rotate", "hadamard:r5"], "unknown rotation stages"),
])
def test_cli_refusals_are_one_line(argv, message, tmp_path, capsys):
    path = tmp_path / "gemma"
    tiny_model("gemma3").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    capsys.readouterr()
    code = main(["--quiet", "compress", str(path), "--uniform", "4", "--method", "rtn", *argv, "--out",
                 str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_gemma3_r2_alone_runs(tmp_path):
    result = layerwise.compress(tiny_model("gemma3"), uniform=4, method="rtn", group_size=16, rotate="hadamard:r2",
                                progress=False)
    assert result.rotation is not None and result.rotation.r1 is None and not result.rotation.untied_head


def outlier_model(seed: int, channels=(3, 17, 40), factor: float = 20.0):
    """A tiny llama whose stream-reading linears have a few input columns 20 times larger than the rest, the
    outlier structure rotations are meant to spread."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        for layer in decoder_layers(model):
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.mlp.gate_proj, layer.mlp.up_proj):
                linear.weight[:, list(channels)] *= factor
    return model


def test_rotation_lowers_4bit_rtn_error_on_outlier_columns():
    ids = random_windows(4, 32, seed=9)
    errors = {}
    for rotate in (None, "hadamard"):
        model = outlier_model(seed=0)
        reference = logits(model, ids)
        result = layerwise.compress(model, uniform=4, method="rtn", group_size=32, rotate=rotate, progress=False)
        weight_error = sum(row.rel_error for row in result.report.rows) / len(result.report.rows)
        output_error = ((logits(result.model, ids) - reference).norm() / reference.norm()).item()
        errors[rotate] = weight_error, output_error
    # ||W Q - Q(W Q)|| / ||W Q|| is comparable with ||W - Q(W)|| / ||W||: Q keeps norms.
    assert errors["hadamard"][0] < 0.8 * errors[None][0]
    assert errors["hadamard"][1] < errors[None][1]


def test_rotation_with_a_method_without_hessian_warns_and_with_gptq_does_not(tied_model_dir, tmp_path, capsys):
    with pytest.warns(UserWarning, match="rotate with --method gptq or gptaq"):
        layerwise.compress(str(tied_model_dir), uniform=4, method="rtn", group_size=32, rotate="hadamard",
                           progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layerwise.compress(str(tied_model_dir), uniform=4, method="gptq", group_size=32, rotate="hadamard",
                           progress=False, **CALIB)
    assert main(["--quiet", "compress", str(tied_model_dir), "--uniform", "4", "--method", "rtn", "--group-size",
                 "32", "--rotate", "hadamard", "--out", str(tmp_path / "ckpt")]) == 0
    err = capsys.readouterr().err
    assert "layerwise: warning: rotation with --method rtn" in err
    assert "UserWarning" not in err  # one line, not the source line of the warning


# --- rotate="auto", the default -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory):
    """A tiny llama whose head is its own tensor (as Llama-3-8B's), saved with a tokenizer."""
    tokenizer = tiny_tokenizer()
    config = tiny_config("llama")
    config.vocab_size = len(tokenizer)
    assert not config.tie_word_embeddings
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("untied-llama")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def recipe_of(ckpt) -> dict:
    return json.loads((ckpt / "layerwise.json").read_text())["recipe"]


def test_the_default_is_gptaq_with_auto_rotation_which_rotates_an_untied_model(untied_model_dir, tmp_path):
    result = layerwise.compress(str(untied_model_dir), uniform=4, group_size=32, out=str(tmp_path / "auto"),
                                progress=False, **CALIB)
    assert result.rotation is not None and result.rotation.r1 is not None and not result.rotation.untied_head
    recipe = recipe_of(tmp_path / "auto")
    assert recipe["method"] == "gptaq" and recipe["rotate"] == "hadamard"  # the choice, not "auto"
    layerwise.compress(str(untied_model_dir), uniform=4, group_size=32, rotate="hadamard", method="gptaq",
                       out=str(tmp_path / "explicit"), progress=False, **CALIB)
    assert (tmp_path / "auto" / "model.safetensors").read_bytes() == \
        (tmp_path / "explicit" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("case", ["tied head", "rtn", "gpt2", "gemma3"])
def test_auto_does_not_rotate_where_rotation_costs_storage_hurts_or_is_not_exact(case, tied_model_dir,
                                                                                 untied_model_dir):
    model, method = {"tied head": (str(tied_model_dir), "gptq"), "rtn": (str(untied_model_dir), "rtn"),
                     "gpt2": (tiny_model("gpt2"), "gptq"), "gemma3": (tiny_model("gemma3"), "gptq")}[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silently: nothing was asked for explicitly
        result = layerwise.compress(model, uniform=4, method=method, group_size=16, progress=False,
                                    calib=random_windows(8, 40, seed=5))
    assert result.rotation is None and "rotate" not in result.recipe.to_dict()


def test_auto_in_a_streamed_run_says_it_does_not_rotate_and_matches_no_rotation(untied_model_dir, tmp_path):
    with pytest.warns(UserWarning, match="streaming cannot rotate yet, so this run does not"):
        layerwise.compress(str(untied_model_dir), uniform=4, method="gptq", group_size=32, stream=True,
                           out=str(tmp_path / "st"), progress=False, **CALIB)
    assert "rotate" not in recipe_of(tmp_path / "st")
    layerwise.compress(str(untied_model_dir), uniform=4, method="gptq", group_size=32, stream=False, rotate=None,
                       out=str(tmp_path / "mem"), progress=False, **CALIB)
    assert (tmp_path / "st" / "model.safetensors").read_bytes() == (tmp_path / "mem" / "model.safetensors").read_bytes()


def test_cli_rotate_none_turns_the_default_rotation_off(untied_model_dir, tmp_path):
    assert main(["--quiet", "compress", str(untied_model_dir), "--uniform", "4", "--group-size", "32",
                 "--rotate", "none", *CALIB_FLAGS, "--out", str(tmp_path / "off")]) == 0
    recipe = recipe_of(tmp_path / "off")
    assert "rotate" not in recipe and recipe["method"] == "gptaq"
