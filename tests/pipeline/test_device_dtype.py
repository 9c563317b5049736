"""The pipeline on a device and in a dtype: refused before any work when impossible, bf16 on the CPU end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_windows

import layerwise
from layerwise.core.errors import LayerwiseError

WINDOWS = random_windows(4, 24, seed=5)


def _no_work(*args, **kwargs):
    raise AssertionError("slow work ran before the device was checked")


@pytest.mark.parametrize(("device", "dtype", "words"), [
    ("cuda", None, "CUDA is not available"),
    ("cuda:3", None, "CUDA is not available"),
    ("gpu", None, "unknown device"),
    ("cpu", "float16", "float16"),
    ("cpu", "int8", "dtype"),
])
def test_impossible_placement_is_refused_before_any_work(tiny_model_dir, tmp_path, monkeypatch, device, dtype, words):
    monkeypatch.setattr("layerwise.engine.sources.load_model", _no_work)
    monkeypatch.setattr("layerwise.engine.pipeline.calibration_windows", _no_work)
    with pytest.raises(LayerwiseError, match=words) as info:
        layerwise.compress(str(tiny_model_dir), uniform=4, method="rtn", group_size=32, out=str(tmp_path / "o"),
                           device=device, dtype=dtype, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_bfloat16_on_the_cpu_compresses_and_records_the_dtype(tiny_model_dir, tmp_path, stream):
    out = tmp_path / "bf16"
    result = layerwise.compress(str(tiny_model_dir), uniform=4, method="gptq", group_size=32, calib=WINDOWS,
                                out=str(out), stream=stream, dtype="bfloat16", progress=False)
    meta = json.loads((out / "layerwise.json").read_text())
    assert meta["dtype"] == "bfloat16"
    assert meta["recipe"]["dtype"] == "bfloat16"
    assert result.report.metrics["phase_seconds"]["quantize"] >= 0
    ckpt = layerwise.load(out)
    with torch.inference_mode():
        logits = ckpt.model(input_ids=WINDOWS[:1]).logits
    assert torch.isfinite(logits).all()


def test_bfloat16_result_is_close_to_float32(tiny_model_dir):
    kwargs = dict(uniform=8, method="rtn", group_size=32, progress=False)
    full = layerwise.compress(str(tiny_model_dir), **kwargs)
    half = layerwise.compress(str(tiny_model_dir), dtype="bfloat16", **kwargs)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        a = full.model(input_ids=WINDOWS[:1]).logits
        b = half.model(input_ids=WINDOWS[:1]).logits.float()
    assert (a - b).abs().max() / a.abs().max() < 0.05
