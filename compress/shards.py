"""Safetensors files read and written one tensor at a time, for models that do not fit in memory.

`SafetensorsSource` reads a Hugging Face model directory (``model.safetensors``, or shards listed by
``model.safetensors.index.json``): the headers give every tensor's name, dtype and shape without reading
data, and `read` opens only the files that hold the requested tensors, copies them out and closes the
files again, so no mapping of a whole shard stays resident between calls.

`write_safetensors` writes one safetensors file from tensors produced one at a time (a generator per
tensor is called only when its bytes are due). The layout is exactly what ``safetensors.torch.save_file``
writes (tests compare the bytes): an 8-byte little-endian header length, a compact JSON header with
``__metadata__`` first and then the tensors in data order, padded with spaces to a multiple of 8 bytes,
then the raw little-endian tensor data, tensors sorted by dtype (widest-ranked first, in safetensors'
``Dtype`` enum order) and then by name.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from layerwise.errors import LayerwiseError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
}
_TORCH = {v: k for k, v in _DTYPES.items()}
# safetensors' Dtype enum order (Rust); data is laid out by this rank, highest first, then by name.
_RANK = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
         "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
_ELEMENT_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "F64": 8, "I64": 8}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(file: Path) -> dict[str, dict]:
    """The JSON header of one safetensors file (tensor name -> dtype, shape, offsets), without its data."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise LayerwiseError(f"{file} is not a readable safetensors file ({exc}); the files are damaged") from None
    header.pop("__metadata__", None)
    return header


class SafetensorsSource:
    """The weights of a saved model, by tensor name, read on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({self.path / f for f in weight_map.values()})
        elif (self.path / SINGLE_FILE).is_file():
            files = [self.path / SINGLE_FILE]
        else:
            raise LayerwiseError(
                f"{self.path} holds neither {SINGLE_FILE} nor {INDEX_FILE}; streaming reads safetensors weights "
                "(save the model with save_pretrained, or compress it without --stream)"
            )
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, entry in read_header(file).items():
                self.tensors[name] = TensorInfo(file, entry["dtype"], tuple(entry["shape"]))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def nbytes(self, element_bytes: int = 4) -> int:
        """The weights' size with `element_bytes` per element (4: as float32)."""
        return sum(t.numel for t in self.tensors.values()) * element_bytes

    def fingerprint(self) -> list[list]:
        """(file name, size, mtime in ns) of every weight file: a changed file means a different model."""
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (cast to `dtype` if given); each file is opened once and closed afterwards."""
        names = list(names)
        missing = [n for n in names if n not in self.tensors]
        if missing:
            raise LayerwiseError(f"{self.path}: the weight files lack tensors {missing[:5]}; the model is incomplete")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in file_names:
                    tensor = f.get_tensor(name)
                    out[name] = tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)
        return {name: out[name] for name in names}


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its header entry now, its data from `produce()` when its turn comes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = _ELEMENT_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def pending(name: str, tensor: torch.Tensor) -> PendingTensor:
    """A `PendingTensor` for a tensor already in memory."""
    return PendingTensor(name, safetensors_dtype(tensor.dtype), tuple(tensor.shape), lambda: tensor)


def safetensors_dtype(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise LayerwiseError(f"dtype {dtype} cannot be written to safetensors by layerwise") from None


def write_safetensors(file: str | os.PathLike, tensors: Iterable[PendingTensor], metadata: dict[str, str]) -> None:
    """Write `tensors` as one safetensors file, holding one tensor's data in memory at a time."""
    entries = sorted(tensors, key=lambda t: (-_RANK.index(t.dtype), t.name))
    names = [t.name for t in entries]
    if len(set(names)) != len(names):
        raise LayerwiseError(f"duplicate tensor names in {file}")
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in entries:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in entries:
            tensor = t.produce()
            if safetensors_dtype(tensor.dtype) != t.dtype or tuple(tensor.shape) != t.shape:
                raise LayerwiseError(
                    f"tensor {t.name} changed between planning and writing {file}: {tensor.dtype} "
                    f"{tuple(tensor.shape)}, expected {t.dtype} {t.shape}"
                )
            data = tensor.detach().contiguous().reshape(-1)
            f.write(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
            del tensor, data
        f.flush()
        os.fsync(f.fileno())


def read_entries(file: Path) -> list[PendingTensor]:
    """Every tensor of a safetensors file as a `PendingTensor` that reads it when due."""
    return [
        PendingTensor(name, entry["dtype"], tuple(entry["shape"]), _reader(file, name))
        for name, entry in read_header(file).items()
    ]


def _reader(file: Path, name: str) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)

    return read


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH[name]
