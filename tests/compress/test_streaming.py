"""Streaming compression: the same checkpoint, byte for byte, as compressing in memory; one layer loaded at a time."""

from __future__ import annotations

import functools
import json
import struct

import pytest
import safetensors.torch
import torch
from conftest import random_windows, tiny_model, tiny_tokenizer

import layerwise
from layerwise.core.errors import LayerwiseError
from layerwise.engine.streaming import StreamedModel, partial_dir
from layerwise.model.shards import SafetensorsSource, pending, write_safetensors

WINDOWS = random_windows(6, 24)


def saved_model(tmp_path, arch: str, sharded: bool = True, n_layers: int = 3):
    """A tiny random model saved as bf16 safetensors (sharded with an index unless told otherwise)."""
    model = tiny_model(arch, n_layers=n_layers).to(torch.bfloat16)
    path = tmp_path / f"{arch}-src"
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "1GB")
    _tokenizer().save_pretrained(path)
    return path


@functools.cache
def _tokenizer():
    return tiny_tokenizer()


def streamed(path, out, **kwargs):
    return layerwise.compress(str(path), progress=False, stream=True, out=str(out), **kwargs)


# rotate=None: a streamed run cannot rotate (auto chooses none there), and these cases compare it with an
# in-memory run, where auto would rotate the untied llama.
CASES = {
    "lim-rtn": dict(bits=3.25, scorer="lim", method="rtn", group_size=32, calib=WINDOWS),
    "zd-gptq": dict(bits=3.0, scorer="zd", method="gptq", group_size=32, calib=WINDOWS, rotate=None),
    "uniform-gptq": dict(uniform=4, method="gptq", group_size=32, calib=WINDOWS, rotate=None),
}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_checkpoint_is_byte_identical_to_in_memory(tmp_path, arch, case):
    path = saved_model(tmp_path, arch)
    assert (path / "model.safetensors.index.json").is_file()
    kwargs = CASES[case]
    mem_out = tmp_path / "mem"
    layerwise.save(layerwise.compress(str(path), progress=False, stream=False, **kwargs), str(mem_out))
    result = streamed(path, tmp_path / "st", **kwargs)
    assert result.model is None and result.report.metrics["streamed"]
    a = (mem_out / "model.safetensors").read_bytes()
    b = (tmp_path / "st" / "model.safetensors").read_bytes()
    assert a == b
    assert not partial_dir(tmp_path / "st").exists()
    meta = json.loads((tmp_path / "st" / "layerwise.json").read_text())
    assert meta["plan"] == json.loads((mem_out / "layerwise.json").read_text())["plan"]
    ckpt = layerwise.load(tmp_path / "st")
    logits = ckpt.model(input_ids=WINDOWS[:1]).logits
    assert torch.isfinite(logits).all()


def test_only_one_layer_is_in_memory_at_a_time(tmp_path):
    path = saved_model(tmp_path, "llama", n_layers=4)
    streamed_model = StreamedModel(path)
    loaded: list[int] = []
    real_load, real_release = streamed_model.load, streamed_model.release

    def load(index):
        resident = [i for i, layer in enumerate(streamed_model.layers)
                    if any(p.device.type != "meta" for p in layer.parameters())]
        assert resident == [], f"layers {resident} still in memory when loading {index}"
        loaded.append(index)
        return real_load(index)

    streamed_model.load = load
    from layerwise.importance import score_model

    score_model(streamed_model.model, ["lim"], WINDOWS, progress=False, weights=streamed_model)
    assert loaded == [0, 1, 2, 3]
    assert all(p.device.type == "meta" for p in streamed_model.model.parameters())
    del real_release


def test_streaming_refuses_what_needs_the_whole_model(tmp_path):
    path = saved_model(tmp_path, "llama")
    with pytest.raises(LayerwiseError, match="sensitivity.*whole model"):
        streamed(path, tmp_path / "o", bits=3.25, calib=WINDOWS)
    with pytest.raises(LayerwiseError, match="prune"):
        streamed(path, tmp_path / "o", uniform=4, prune=1, calib=WINDOWS)
    with pytest.raises(LayerwiseError, match="out="):
        layerwise.compress(str(path), uniform=4, stream=True, progress=False)


def test_auto_rule_streams_large_models(tmp_path, monkeypatch):
    import layerwise.engine.streaming as streaming

    path = saved_model(tmp_path, "llama")
    monkeypatch.setattr(streaming, "available_memory", lambda: 10**4)  # the model is "large" now
    result = layerwise.compress(str(path), uniform=4, method="rtn", out=str(tmp_path / "o"), progress=False)
    assert result.model is None
    monkeypatch.setattr(streaming, "available_memory", lambda: 10**12)
    result = layerwise.compress(str(path), uniform=4, method="rtn", out=str(tmp_path / "p"), progress=False)
    assert result.model is not None
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == (tmp_path / "p" / "model.safetensors").read_bytes()


def test_writer_matches_safetensors_byte_for_byte(tmp_path):
    tensors = {"b": torch.randn(3, 5).half(), "a": torch.arange(7, dtype=torch.int32), "c": torch.randn(4),
               "z": torch.randn(2, 2).bfloat16(), "y": torch.arange(5, dtype=torch.uint8), "x": torch.arange(3),
               "w": torch.tensor([True, False]), "v": torch.randn(2).double(), "u": torch.arange(4, dtype=torch.int8),
               "t": torch.arange(3, dtype=torch.int16), "s": torch.zeros(0, 4)}
    safetensors.torch.save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    write_safetensors(tmp_path / "ours.safetensors", [pending(n, t) for n, t in tensors.items()], {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_source_reads_sharded_and_single_files(tmp_path):
    for sharded in (True, False):
        path = saved_model(tmp_path / str(sharded), "llama", sharded=sharded)
        source = SafetensorsSource(path)
        assert (len(source.files) > 1) == sharded
        name = "model.layers.1.mlp.down_proj.weight"
        tensor = source.read([name], torch.float32)[name]
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == source.tensors[name].shape
        header_len = struct.unpack("<Q", source.files[0].read_bytes()[:8])[0]
        assert header_len % 8 == 0


def _shard_of(path, name: str):
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    return path / weight_map[name]


def _poison(path, name: str, index, value: float) -> None:
    shard = _shard_of(path, name)
    state = safetensors.torch.load_file(shard)
    state[name][index] = value
    safetensors.torch.save_file(state, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["lim-rtn", "uniform-gptq"])
def test_nan_and_inf_weights_are_named_and_nothing_is_left(tmp_path, case):
    path = saved_model(tmp_path, "llama")
    _poison(path, "model.layers.1.self_attn.q_proj.weight", (0, slice(0, 3)), float("nan"))
    out = tmp_path / "o"
    with pytest.raises(LayerwiseError, match=r"layers\.1\.self_attn\.q_proj\.weight \(3 NaN, 0 Inf\).*re-export"):
        streamed(path, out, **CASES[case])
    assert not out.exists() and not partial_dir(out).exists()  # layer 0 was done, then dropped

    _poison(path, "lm_head.weight", (2, 5), float("-inf"))  # never loaded to compress: checked up front
    with pytest.raises(LayerwiseError, match=r"lm_head\.weight \(0 NaN, 1 Inf\)"):
        streamed(path, out, **CASES[case])
    assert not out.exists() and not partial_dir(out).exists()


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (lambda data: data[: len(data) // 2], "ends at byte"),
        (lambda data: data[:-1], "ends at byte"),
        (lambda data: b"\xff" * 8 + data[8:], "no readable safetensors header"),
        (lambda data: b"", "no readable safetensors header"),
    ],
    ids=["half", "last-byte", "header", "empty"],
)
def test_damaged_weight_files_are_named(tmp_path, damage, detail):
    path = saved_model(tmp_path, "llama")
    shard = _shard_of(path, "model.layers.2.mlp.up_proj.weight")
    shard.write_bytes(damage(shard.read_bytes()))
    out = tmp_path / "o"
    with pytest.raises(LayerwiseError, match="damaged") as info:
        streamed(path, out, **CASES["lim-rtn"])
    assert shard.name in str(info.value) and detail in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and not partial_dir(out).exists()


def test_a_file_cut_short_after_opening_is_named(tmp_path):
    path = saved_model(tmp_path, "llama")
    source = SafetensorsSource(path)
    name = "model.layers.1.mlp.down_proj.weight"
    shard = _shard_of(path, name)
    shard.write_bytes(shard.read_bytes()[: source.tensors[name].start + 10])
    with pytest.raises(LayerwiseError, match=f"cannot read {shard.name} .*{name}.*truncated or damaged"):
        source.read([name], torch.float32)


def test_reads_convert_exactly_in_pieces(tmp_path, monkeypatch):
    import layerwise.model.shards as shards

    path = saved_model(tmp_path, "llama", sharded=False)
    reference = safetensors.torch.load_file(path / "model.safetensors")
    monkeypatch.setattr(shards, "READ_CHUNK", 100)  # many pieces per tensor, and a short last one
    source = SafetensorsSource(path)
    for name, tensor in reference.items():
        assert torch.equal(source.read([name], torch.float32)[name], tensor.to(torch.float32))
        stored = source.read([name])[name]
        assert stored.dtype == tensor.dtype and torch.equal(stored, tensor)
