"""benchmarks/anchors.py on a tiny llama: the table's plumbing (the real run takes minutes per row).

Rows run in this process (``--in-process``): a row's own process would import torch and transformers
again, which costs more than the whole tiny run.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import QuantSpec
from layerwise.model.adapter import layer_linear_shapes
from layerwise.model.loading import load_model

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "anchors.py"
TINY = ["--in-process", "--max-eval-tokens", "128", "--eval-window", "64", "--calib-windows", "2",
        "--calib-len", "32"]


@pytest.fixture(scope="module")
def anchors():
    spec = importlib.util.spec_from_file_location("anchors", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def run(anchors, model_dir: Path, out: Path, only: str, *extra: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 64 calibration tokens: rank-deficient Hessians, on purpose
        return anchors.main([*TINY, "--model", str(model_dir), "--out", str(out), "--only", only, *extra])


def test_fp32_and_a_layerwise_row_make_the_table(anchors, tiny_model_dir, tmp_path, capsys):
    run(anchors, tiny_model_dir, tmp_path, "fp32,lw-uniform-4-g64")
    data = json.loads((tmp_path / anchors.JSON_FILE).read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["fp32", "lw-uniform-4-g64"]
    assert all(r["status"] == "ok" for r in rows.values()), rows
    fp32, uniform = rows["fp32"], rows["lw-uniform-4-g64"]
    assert fp32["bits"] == 32.0 and fp32["perplexity"] > 1
    # The layerwise row's bits are its report's: uniform 4-bit group 64 (default method) over the tiny shapes.
    model, _ = load_model(str(tiny_model_dir))
    spec = QuantSpec(4, 64, "gptaq")
    shapes = layer_linear_shapes(model)
    expected = sum(spec.storage_bits(*s) for layer in shapes for s in layer.values()) / sum(
        o * i for layer in shapes for o, i in layer.values())
    assert uniform["bits"] == pytest.approx(expected)
    assert uniform["perplexity"] != fp32["perplexity"] and uniform["seconds"] >= 0
    assert data["settings"]["calib_windows"] == 2 and data["protocol"]["window_len"] == 64
    table = (tmp_path / anchors.MD_FILE).read_text()
    ratio = uniform["perplexity"] / fp32["perplexity"]
    assert "| lw-uniform-4-g64 |" in table and f"| {ratio:.3f} |" in table
    assert "Smoke settings" in table
    assert table in capsys.readouterr().out


def test_a_failing_row_is_a_line_and_the_others_run(anchors, tiny_model_dir, tmp_path, monkeypatch):
    def broken(model, tokenizer, settings):
        raise RuntimeError("no kernel for this\nsecond line")

    monkeypatch.setitem(anchors.ROWS, "hqq-4b-g64", anchors.Row("hqq-4b-g64", "HQQ", broken, "anchors"))
    monkeypatch.setitem(anchors.ROWS, "bnb-nf4-dq", anchors.Row("bnb-nf4-dq", "NF4", broken, "anchors",
                                                                ("no_such_module_here",), "pip install it"))
    results = run(anchors, tiny_model_dir, tmp_path, "bnb-nf4-dq,hqq-4b-g64,fp32")
    status = {r.name: (r.status, r.note) for r in results}
    assert status["hqq-4b-g64"] == ("failed", "RuntimeError: no kernel for this")
    assert status["bnb-nf4-dq"] == ("skipped", "no_such_module_here not installed: pip install it")
    assert status["fp32"][0] == "ok"
    table = (tmp_path / anchors.MD_FILE).read_text()
    assert "| hqq-4b-g64 | HQQ | failed | | | | RuntimeError: no kernel for this |" in table


def test_a_rerun_keeps_the_rows_it_does_not_repeat_when_the_settings_match(anchors):
    settings = anchors.Settings(calib_windows=2)
    earlier = [anchors.RowResult("lw-3", "layerwise", "ok", 20.0, 3.0, 1.0),
               anchors.RowResult("fp32", "fp32", "ok", 19.0, 32.0, 0.0)]
    previous = {"settings": anchors.asdict(settings), "rows": [anchors.asdict(r) for r in earlier]}
    new = [anchors.RowResult("fp32", "fp32", "ok", 18.0, 32.0, 0.0), anchors.RowResult("hqq-4b-g64", "HQQ", "ok")]
    merged = anchors.merged_rows(previous, settings, new)
    assert [(r.name, r.perplexity) for r in merged] == [("fp32", 18.0), ("hqq-4b-g64", None), ("lw-3", 20.0)]
    other = anchors.Settings(calib_windows=3)
    assert [r.name for r in anchors.merged_rows(previous, other, new)] == ["fp32", "hqq-4b-g64"]


def test_rows_and_groups_are_checked(anchors):
    assert anchors.selected_rows("anchors")[0] == "fp32"
    assert all(name.startswith("lw-") for name in anchors.selected_rows("layerwise"))
    with pytest.raises(LayerwiseError, match="unknown row 'nf5'; choose from: all, anchors"):
        anchors.selected_rows("fp32,nf5")


def test_a_crashed_row_process_reports_its_exit_code_and_last_line(anchors, tmp_path):
    command = [sys.executable, "-c", "import sys; print('loading'); print('Killed', file=sys.stderr); sys.exit(137)"]
    result = anchors.run_child(command, tmp_path / "never-written.json", "hqq-4b-g64")
    assert (result.status, result.note) == ("failed", "process exited with code 137: Killed")


def test_pack_quantized_bits_match_compressed_tensors_packing(anchors):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out_features, in_features, group = 40, 200, 64  # neither a multiple of 32 nor of the group
    for bits in (3, 4):
        groups = -(-in_features // group)
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (out_features, in_features), dtype=torch.int8)
        zeros = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (out_features, groups), dtype=torch.int8)
        stored = 32 * (pack_to_int32(codes, bits).numel() + pack_to_int32(zeros, bits, packed_dim=0).numel())
        stored += 16 * out_features * groups
        assert anchors.pack_quantized_bits(out_features, in_features, bits, group) == stored


def test_nf4_double_quant_bits_count_every_stored_tensor(anchors):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(64, 1024)
    plain, plain_state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    nested, nested_state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    blocks = weight.numel() // 64
    # Double quantization turns each block's fp32 absmax into 8 bits, plus fp32 per 256 blocks and its tables.
    saved = anchors.nf4_storage_bits(plain, plain_state) - anchors.nf4_storage_bits(nested, nested_state)
    assert saved == 24 * blocks - 32 * (-(-blocks // 256) + 256 + 1)
