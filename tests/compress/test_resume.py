"""Resume: a streamed compression killed in a middle layer and resumed writes the same bytes as one never killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import interrupt_streaming_at, random_windows, record_quantized_loads, tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM

import layerwise
from layerwise.core.errors import LayerwiseError
from layerwise.engine.streaming import KILL_ENV, partial_dir

N_LAYERS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "llama"
    tokenizer = tiny_tokenizer()
    config = tiny_config("llama", n_layers=N_LAYERS)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="40KB")
    tokenizer.save_pretrained(path)
    return path


def same_weights(a, b) -> bool:
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def cli(model_dir, out, *extra, kill_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = str(kill_at)
    argv = [sys.executable, "-m", "layerwise.cli", "--quiet", "compress", str(model_dir), "--bits", "3.0",
            "--scorer", "lim", "--method", "gptq", "--group-size", "32", "--calib", "pydoc",
            "--calib-windows", "6", "--calib-len", "32", "--out", str(out), *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_in_a_middle_layer_then_resume_is_byte_identical(model_dir, tmp_path):
    whole = cli(model_dir, tmp_path / "whole", "--stream")
    assert whole.returncode == 0, whole.stderr
    killed = cli(model_dir, tmp_path / "ckpt", "--stream", kill_at=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    work = partial_dir(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert sorted(p.name for p in (work / "layers").iterdir()) == [
        "layer-00000.json", "layer-00000.safetensors", "layer-00001.json", "layer-00001.safetensors"]
    assert (work / "hidden-00002.safetensors").is_file() and (work / "plan.json").is_file()

    resumed = cli(model_dir, tmp_path / "ckpt", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(tmp_path / "ckpt", tmp_path / "whole")
    assert not work.exists()
    whole_meta = json.loads((tmp_path / "whole" / "layerwise.json").read_text())
    meta = json.loads((tmp_path / "ckpt" / "layerwise.json").read_text())
    assert meta["plan"] == whole_meta["plan"]
    assert [r["rel_error"] for r in meta["report"]["rows"]] == [r["rel_error"] for r in whole_meta["report"]["rows"]]


def test_interrupted_rtn_run_resumes_in_process(model_dir, tmp_path, monkeypatch):
    kwargs = dict(bits=3.25, scorer="zd", method="rtn", group_size=32, progress=False)
    layerwise.compress(str(model_dir), out=str(tmp_path / "whole"), stream=True, **kwargs)
    interrupt_streaming_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        layerwise.compress(str(model_dir), out=str(tmp_path / "ckpt"), stream=True, **kwargs)
    loaded = record_quantized_loads(monkeypatch)
    for stream in (True, False, None):  # without resume: refused, whichever way it would run
        with pytest.raises(LayerwiseError, match="interrupted streamed compression.*--resume.*remove"):
            layerwise.compress(str(model_dir), out=str(tmp_path / "ckpt"), stream=stream, **kwargs)
    with pytest.raises(LayerwiseError, match="different arguments.*group_size: 32 then, 64 now"):
        layerwise.compress(str(model_dir), out=str(tmp_path / "ckpt"), resume=True, **{**kwargs, "group_size": 64})
    layerwise.compress(str(model_dir), out=str(tmp_path / "ckpt"), resume=True, **kwargs)
    assert loaded == [3]  # layers 0-2 were not quantized again
    assert same_weights(tmp_path / "ckpt", tmp_path / "whole")


def test_resume_with_no_partial_run_starts_fresh(model_dir, tmp_path):
    out = tmp_path / "fresh"
    layerwise.compress(str(model_dir), uniform=4, method="rtn", out=str(out), resume=True, progress=False,
                       calib=random_windows())
    assert (out / "model.safetensors").is_file() and not partial_dir(out).exists()
    with pytest.raises(LayerwiseError, match="stream=False"):
        layerwise.compress(str(model_dir), uniform=4, out=str(tmp_path / "x"), resume=True, stream=False)


def test_resume_uses_the_thread_count_the_run_started_with(model_dir, tmp_path, monkeypatch):
    """GPTQ's float sums depend on torch's thread count; a resume continues with the saved count."""
    kwargs = dict(uniform=3, method="gptq", group_size=32, progress=False, calib=random_windows(6, 32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        layerwise.compress(str(model_dir), out=str(tmp_path / "whole"), stream=True, **kwargs)
        interrupt_streaming_at(monkeypatch, 2)
        with pytest.raises(KeyboardInterrupt):
            layerwise.compress(str(model_dir), out=str(tmp_path / "ckpt"), stream=True, **kwargs)
        monkeypatch.undo()
        torch.set_num_threads(2)
        with pytest.warns(RuntimeWarning, match="resuming with 1 torch threads"):
            layerwise.compress(str(model_dir), out=str(tmp_path / "ckpt"), resume=True, **kwargs)
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(threads)
    assert same_weights(tmp_path / "ckpt", tmp_path / "whole")
