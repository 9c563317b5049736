"""`layerwise.model.device`: --device and --dtype resolved, and every request this machine cannot serve refused in
one line. CUDA is mocked (torch.cuda.is_available / device_count), so these run on any machine."""

from __future__ import annotations

import json

import pytest
import torch

from layerwise.core.errors import LayerwiseError
from layerwise.model import device as dev
from layerwise.model.device import checkpoint_dtype, resolve_device, resolve_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def refusal(fn, *args) -> str:
    with pytest.raises(LayerwiseError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("spec", "expected"), [(None, CPU), ("auto", CPU), ("cpu", CPU), (" CPU ", CPU)])
def test_devices_without_cuda(spec, expected, no_cuda):
    assert resolve_device(spec) == expected


@pytest.mark.parametrize(("spec", "expected"), [
    (None, CUDA), ("auto", CUDA), ("cpu", CPU), ("cuda", CUDA), ("cuda:1", torch.device("cuda", 1)),
    (torch.device("cuda", 0), torch.device("cuda", 0)),
])
def test_devices_with_two_gpus(spec, expected, two_gpus):
    assert resolve_device(spec) == expected


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_names_the_build_and_the_fix(spec, no_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    message = refusal(resolve_device, spec)
    assert message.startswith(f"device {spec!r}: CUDA is not available (torch {torch.__version__} is a CPU-only build)")
    assert message.endswith("use --device cpu or --device auto")


def test_cuda_build_without_a_visible_gpu(no_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert "is built for CUDA but sees no GPU; check the driver and CUDA_VISIBLE_DEVICES" in refusal(
        resolve_device, "cuda")


def test_cuda_index_out_of_range(two_gpus):
    assert refusal(resolve_device, "cuda:2") == ("device 'cuda:2': torch sees 2 CUDA devices (cuda:0 to cuda:1); "
                                                 "choose one of those, or --device cuda")


@pytest.mark.parametrize(("spec", "hint"), [("gpu", " (did you mean cuda?)"), ("tpu", ""), ("cuda:x", ""),
                                            ("cuda:-1", ""), ("", ""), ("garbage", "")])
def test_unknown_devices(spec, hint, two_gpus):
    assert refusal(resolve_device, spec) == (f"unknown device {spec!r}{hint}; choose one of auto, cpu, cuda, "
                                             "cuda:N, e.g. --device auto")


def test_mps_only_where_torch_has_it(monkeypatch):
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert "MPS (Apple GPU) is not available on this machine; use --device cpu" in refusal(resolve_device, "mps")
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize(("spec", "device", "ckpt", "expected"), [
    (None, CPU, torch.bfloat16, torch.float32),  # the CPU defaults to float32 whatever the checkpoint says
    (None, CUDA, torch.bfloat16, torch.bfloat16),  # a GPU takes the checkpoint's own
    (None, CUDA, torch.float16, torch.float16),
    (None, CUDA, None, torch.float32),  # unknown
    (None, CUDA, torch.int8, torch.float32),  # not a float type
    (None, CUDA, torch.float64, torch.float32),  # not one layerwise runs in
    ("float32", CUDA, torch.bfloat16, torch.float32),
    ("bfloat16", CPU, None, torch.bfloat16),  # allowed on the CPU
    ("BF16", CPU, None, torch.bfloat16),
    ("fp32", CPU, None, torch.float32),
    ("fp16", CUDA, None, torch.float16),
    (torch.float16, CUDA, None, torch.float16),
])
def test_dtypes(spec, device, ckpt, expected):
    assert resolve_dtype(spec, device, ckpt) == expected


@pytest.mark.parametrize("spec", ["float16", "fp16", torch.float16])
def test_float16_on_the_cpu_is_refused_with_the_reason_and_the_fix(spec):
    message = refusal(resolve_dtype, spec, CPU, None)
    assert message.startswith("dtype float16 is refused on the CPU: many CPU kernels lack float16")
    assert "overflows" in message and message.endswith("use --dtype bfloat16 or float32 on the CPU")


@pytest.mark.parametrize("spec", ["int8", "float64", "half", "", torch.float64])
def test_unknown_dtypes_name_the_choices(spec):
    assert "; choose one of float32, bfloat16, float16 (fp32 = float32, bf16 = bfloat16, fp16 = float16)" in refusal(
        resolve_dtype, spec, CUDA, None)


@pytest.mark.parametrize(("config", "expected"), [
    ({"dtype": "bfloat16"}, torch.bfloat16),  # transformers 5
    ({"torch_dtype": "float16"}, torch.float16),  # older transformers
    ({"dtype": "torch.float32"}, torch.float32),
    ({"dtype": None, "torch_dtype": "bfloat16"}, torch.bfloat16),
    ({}, None),
    ({"dtype": "float99"}, None),
    ({"dtype": "Tensor"}, None),
    ([1, 2], None),
])
def test_checkpoint_dtype_from_config_json(config, expected, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(tmp_path) == expected


def test_checkpoint_dtype_unknown_without_a_readable_config(tmp_path):
    assert checkpoint_dtype(None) is None
    assert checkpoint_dtype(tmp_path / "missing") is None
    assert checkpoint_dtype(tmp_path) is None  # no config.json
    (tmp_path / "config.json").write_text("{not json")
    assert checkpoint_dtype(tmp_path) is None


def test_checkpoint_dtype_of_a_saved_model(tiny_model_dir):
    assert checkpoint_dtype(tiny_model_dir) == torch.float32
