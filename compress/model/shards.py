"""Safetensors files read and written one tensor at a time, for models that do not fit in memory.

`SafetensorsSource` reads a Hugging Face model directory (``model.safetensors``, or shards listed by
``model.safetensors.index.json``): the headers give every tensor's name, dtype, shape and byte range
without reading data, and `read` reads each requested tensor's bytes with plain file reads straight into
its result (converting, say, bf16 to float32 a 64 MiB piece at a time), so memory holds the result and
one piece, never a mapping of the shard or a second whole copy in the stored dtype. A file shorter than
its header says, or one whose header does not parse, is refused up front as damaged (`BadWeights`).

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

from layerwise.core.errors import LayerwiseError

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


class BadWeights(LayerwiseError):
    """The model's weights cannot be used as they are (a damaged file, NaN or Inf values): no run on them
    can succeed, so a streamed compression drops its work directory instead of leaving it to resume."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]
    start: int = 0  # byte range of the data in the file
    stop: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(file: Path) -> dict[str, dict]:
    """The JSON header of one safetensors file (tensor name -> dtype, shape, offsets), without its data."""
    return _read_layout(file)[0]


def _read_layout(file: Path) -> tuple[dict[str, dict], int]:
    """The header of `file` and the file offset where its data starts."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise damaged(file, f"no readable safetensors header: {exc}") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def damaged(file: Path, reason: str) -> BadWeights:
    """The error for a weights file that cannot be read, worded as the in-memory loader words it."""
    return BadWeights(f"model {file.parent} in {file.parent}: cannot read {file.name} ({reason}); the file is "
                      "truncated or damaged, save or download the model again")


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
            if not file.is_file():
                raise BadWeights(f"{self.path}: {file.name}, listed in {INDEX_FILE}, is missing; the model is "
                                 "incomplete, save or download it again")
            header, base = _read_layout(file)
            size = file.stat().st_size
            for name, entry in header.items():
                try:
                    start, stop = (base + int(o) for o in entry["data_offsets"])
                    info = TensorInfo(file, entry["dtype"], tuple(entry["shape"]), start, stop)
                except (KeyError, TypeError, ValueError) as exc:
                    raise damaged(file, f"tensor {name} has a malformed header entry: {exc!r}") from None
                if info.dtype in _ELEMENT_BYTES and info.stop - info.start != info.numel * _ELEMENT_BYTES[info.dtype]:
                    raise damaged(file, f"tensor {name}: {info.stop - info.start} bytes for a {info.dtype} "
                                        f"{info.shape} tensor")
                if info.stop > size:
                    raise damaged(file, f"tensor {name} ends at byte {info.stop}, but the file has {size} bytes")
                self.tensors[name] = info

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
            try:
                with open(file, "rb") as f:
                    for name in file_names:
                        out[name] = _read_tensor(f, name, self.tensors[name], dtype)
            except OSError as exc:
                raise damaged(file, str(exc)) from None
        return {name: out[name] for name in names}


# Bytes read (and converted) at a time when the stored dtype differs from the one asked for.
READ_CHUNK = 64 * 2**20


def _read_tensor(f, name: str, info: TensorInfo, dtype: torch.dtype | None) -> torch.Tensor:
    """Tensor `name` from the open file `f`, as `dtype` (or as stored), without a second full-size copy.

    Exactly ``tensor.to(dtype)`` of the stored tensor: the conversion is elementwise.
    """
    if info.dtype not in _TORCH:
        raise LayerwiseError(f"{info.file}: tensor {name} has dtype {info.dtype}, which layerwise cannot read")
    stored = _TORCH[info.dtype]
    out = torch.empty(info.shape, dtype=stored if dtype is None else dtype)
    flat = out.view(-1)
    element = _ELEMENT_BYTES[info.dtype]
    step = max(1, READ_CHUNK // element)
    buffer = None if out.dtype == stored else torch.empty(min(step, info.numel), dtype=stored)
    f.seek(info.start)
    for a in range(0, info.numel, step):
        n = min(step, info.numel - a)
        target = flat[a : a + n] if buffer is None else buffer[:n]
        got = f.readinto(memoryview(target.view(torch.uint8).numpy()))
        if got != n * element:
            raise damaged(info.file, f"tensor {name}: the file ends before its data does")
        if buffer is not None:
            flat[a : a + n].copy_(target)
    return out


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
