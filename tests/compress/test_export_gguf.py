"""`layerwise export --format gguf`: llama.cpp files whose tensors are the checkpoint's own blocks, loaded by
transformers' GGUF loader (which dequantizes with the `gguf` package) in a process without layerwise."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_windows, tiny_model, tiny_tokenizer
from export_helpers import layerwise_logits, logits_in_subprocess, relative_difference
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import layerwise
from layerwise.cli import main
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import LayerAction, Plan, QuantSpec
from layerwise.output.export import export_checkpoint

IDS = [[(7 * i + 3) % 300 for i in range(24)]]


def wide_model(arch: str, n_layers: int = 5):
    """Hidden 256 and MLP 512: every row is whole 256-weight super-blocks, so k-quants apply as they are."""
    common = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def saved(tmp_path, model, plan, method="gptq", name="ckpt", **kwargs):
    result = layerwise.apply(model, plan, method, tokenizer=tiny_tokenizer(), calib=random_windows(8, 64, seed=1),
                             progress=False, **kwargs)
    layerwise.save(result, tmp_path / name)
    return tmp_path / name


def gguf_logits(tmp_path, name="m.gguf"):
    return logits_in_subprocess(tmp_path, f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, gguf_file={name!r}, dtype=torch.float32)
    """, IDS)


def tensor_types(path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_types_export_exactly(arch, tmp_path):
    """A GPTQ plan of k-quants and a legacy type, per-module overrides, a kept layer: every tensor is written as
    the checkpoint stores it, and the loaded model's logits are layerwise's (q/k rows permuted for llama)."""
    plan = Plan([
        LayerAction.quantized(0, QuantSpec.of_gguf("q4_k", "gptq")),
        LayerAction.quantized(1, QuantSpec.of_gguf("q3_k", "gptq")),
        LayerAction(2, "quantize", 6, 256, "gptq", gguf="q6_k",
                    overrides={"mlp.down_proj": QuantSpec.of_gguf("q2_k", "gptq")}),
        LayerAction(3, "keep"),
        LayerAction.quantized(4, QuantSpec.of_gguf("q8_0", "gptq")),
    ])
    path = saved(tmp_path, wide_model(arch), plan)
    export_checkpoint(path, tmp_path / "m.gguf", "gguf", gguf_embeddings="f32")
    types = tensor_types(tmp_path / "m.gguf")
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.1.ffn_up.weight"] == "Q3_K"
    assert types["blk.2.attn_v.weight"] == "Q6_K" and types["blk.2.ffn_down.weight"] == "Q2_K"
    assert types["blk.3.attn_q.weight"] == "F32" and types["blk.4.attn_output.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    assert relative_difference(gguf_logits(tmp_path), layerwise_logits(path, IDS)) < 1e-6


def test_integer_grids_map_exactly_where_a_llama_cpp_type_holds_them(tmp_path, capsys):
    """Symmetric 4-bit in groups of 32 is q4_0 exactly; asymmetric groups are quantized again (q4_1), and the
    export says so."""
    plan = Plan([LayerAction(0, "quantize", 4, 32, "gptq", sym=True), LayerAction(1, "quantize", 8, 64, "gptq",
                                                                                    sym=True),
                 LayerAction(2, "keep"), LayerAction(3, "keep"), LayerAction(4, "keep")])
    path = saved(tmp_path, wide_model("llama"), plan)
    export_checkpoint(path, tmp_path / "m.gguf", "gguf", gguf_embeddings="f32")
    assert tensor_types(tmp_path / "m.gguf")["blk.0.ffn_gate.weight"] == "Q4_0"
    assert tensor_types(tmp_path / "m.gguf")["blk.1.ffn_gate.weight"] == "Q8_0"
    assert "not exactly a llama.cpp type" not in capsys.readouterr().err
    assert relative_difference(gguf_logits(tmp_path), layerwise_logits(path, IDS)) < 1e-6

    plan.layers[2] = LayerAction(2, "quantize", 3, 64, "gptq")
    path = saved(tmp_path, wide_model("llama"), plan, name="asym")
    export_checkpoint(path, tmp_path / "again.gguf", "gguf")
    assert tensor_types(tmp_path / "again.gguf")["blk.2.ffn_up.weight"] == "Q4_1"
    assert "modules on layerwise's integer grid are not exactly a llama.cpp type" in capsys.readouterr().err
    # Asymmetric 3-bit keeps its codes and scales in q4_1; only the min (-zero * scale) is rounded to fp16.
    deq = layerwise.load(path).model.model.layers[2].mlp.up_proj.dequantize()
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensor = next(t for t in GGUFReader(str(tmp_path / "again.gguf")).tensors if t.name == "blk.2.ffn_up.weight")
    written = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)).reshape(deq.shape)
    assert (written - deq).abs().max() <= 2**-11 * deq.abs().max()


def test_k_quants_fall_back_where_rows_are_not_whole_super_blocks(tmp_path):
    """64-wide rows: q4_k becomes q5_0 there, as llama.cpp does, and the report says so; the budget counts it."""
    model = tiny_model("llama", n_layers=2)
    result = layerwise.compress(model, uniform=None, bits=5.5, options="q4_k,q8_0", target="gguf",
                                calib=random_windows(8, 32, seed=1), progress=False, rotate=None)
    assert any("GGUF type q4_k -> q5_0 for 64-wide inputs" in line for line in result.report.group_fits)
    assert result.plan.made_by["granularity"] == "module"  # --target gguf: a type per tensor by default
    q_proj = result.model.model.layers[0].self_attn.q_proj
    assert q_proj.gguf in ("q5_0", "q8_0") and result.report.avg_bits <= 5.5


def test_a_type_per_tensor_from_damage_measured_per_module(tmp_path):
    """`--target gguf --granularity module`: each tensor gets the llama.cpp type its measured damage earns, the
    budget holds, and the file carries those types with layerwise's logits."""
    result = layerwise.compress(wide_model("llama", n_layers=3), 4.0, options="q2_k,q4_k,q6_k", target="gguf",
                                granularity="module", method="gptq", tokenizer=tiny_tokenizer(),
                                calib=random_windows(8, 64, seed=1), progress=False, rotate=None)
    assert result.plan.made_by["granularity"] == "module" and result.report.avg_bits <= 4.0
    layerwise.save(result, tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "m.gguf", "gguf", gguf_embeddings="f32")
    types = tensor_types(tmp_path / "m.gguf")
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    planned = {f"blk.{a.layer}.{names[m]}.weight": a.module_spec(m).gguf.upper() for a in result.plan.layers
               for m in names}
    assert {k: types[k] for k in planned} == planned
    assert len(set(planned.values())) > 1  # the types differ between tensors
    assert relative_difference(gguf_logits(tmp_path), layerwise_logits(tmp_path / "ckpt", IDS)) < 1e-6


def test_rotated_mse_gptaq_checkpoint_exports_to_both_formats(tmp_path):
    """The quality work's checkpoints (fused rotation with the head untied, the mse grid, GPTAQ) export: the
    rotation is in the weights and the untied head is written, in compressed-tensors and in GGUF."""
    model = tiny_model("llama", n_layers=3)
    result = layerwise.compress(model, uniform=4, group_size=32, sym=True, method="gptaq", grid="mse",
                                rotate="hadamard", tokenizer=tiny_tokenizer(), calib=random_windows(8, 32, seed=1),
                                progress=False, out=tmp_path / "ckpt")
    assert result.rotation is not None and not model.config.tie_word_embeddings
    path = tmp_path / "ckpt"
    ids = [[(5 * i + 1) % 96 for i in range(20)]]
    reference = layerwise_logits(path, ids)
    export_checkpoint(path, tmp_path / "ct", "compressed-tensors")
    got = logits_in_subprocess(tmp_path, f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ct')!r}, dtype=torch.float32)
    """, ids)
    assert relative_difference(got, reference) < 1e-5
    export_checkpoint(path, tmp_path / "m.gguf", "gguf", gguf_embeddings="f32")
    assert "output.weight" in tensor_types(tmp_path / "m.gguf")  # the untied head
    got = logits_in_subprocess(tmp_path, f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, gguf_file="m.gguf", dtype=torch.float32)
    """, ids)
    assert relative_difference(got, reference) < 1e-5


def test_bad_gguf_requests_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(LayerwiseError, match=r"GGUF type q4_0 needs rows of whole 32-weight blocks and 48-wide"):
        QuantSpec.of_gguf("q4_0").fit(48)
    with pytest.raises(LayerwiseError, match="a GGUF type takes only a method"):
        QuantSpec.parse_option("q4_k:gptq:sym")
    with pytest.raises(LayerwiseError, match=r"--target gguf quantizes to llama.cpp types, and 3:128:gptaq is not one"):
        layerwise.compress(tiny_model("llama", 2), 3.5, options="3:128,q4_k", target="gguf", progress=False,
                           calib=random_windows(2, 16))
    with pytest.raises(LayerwiseError, match=r"--target vllm cannot load llama.cpp types \(q4_k:gptaq\)"):
        layerwise.compress(tiny_model("llama", 2), 3.5, options="4:128,q4_k", target="vllm", progress=False,
                           calib=random_windows(2, 16))
    # An architecture without a GGUF mapping here, and an output that exists: refused, nothing written.
    gpt2 = layerwise.apply(tiny_model("gpt2", 2), Plan([LayerAction(0, "keep"), LayerAction(1, "prune")]),
                           progress=False)
    layerwise.save(gpt2, tmp_path / "gpt2")
    with pytest.raises(LayerwiseError, match="architecture 'gpt2' has no GGUF mapping here"):
        export_checkpoint(tmp_path / "gpt2", tmp_path / "g.gguf", "gguf")
    assert not (tmp_path / "g.gguf").exists()
    path = saved(tmp_path, wide_model("llama", 2), Plan([LayerAction.quantized(0, QuantSpec.of_gguf("q4_k", "rtn")),
                                                          LayerAction(1, "keep")]), method="rtn")
    out = tmp_path / "m.gguf"
    assert main(["--quiet", "export", str(path), "--format", "gguf", "--out", str(out)]) == 0
    assert "tensors:" in capsys.readouterr().err
    before = out.read_bytes()
    assert main(["--quiet", "export", str(path), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1 and out.read_bytes() == before
    assert not list(tmp_path.glob(".m.gguf.tmp-*"))
    # GGUF blocks have no compressed-tensors form.
    with pytest.raises(LayerwiseError, match="quantized to llama.cpp types .*Export it with --format gguf"):
        export_checkpoint(path, tmp_path / "ct", "compressed-tensors")
    meta = json.loads((path / "layerwise.json").read_text())
    assert meta["plan"]["layers"][0]["gguf"] == "q4_k"
