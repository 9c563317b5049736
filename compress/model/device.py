"""Where a model runs and in which float type: `--device` and `--dtype`, resolved and checked up front.

Pure functions, no model in sight: the CLI calls them before loading anything, so a request this machine
cannot serve (``--device cuda`` on a CPU-only torch, ``--dtype float16`` on the CPU) is one line and
exit code 2 at once, not a traceback after the model has loaded.

Devices: ``auto`` (or None) is ``cuda`` when torch sees a GPU, else ``cpu``; ``cpu``; ``cuda``; ``cuda:N``;
``mps`` where torch has it (Apple GPUs). Dtypes: ``float32``, ``bfloat16``, ``float16`` (aliases ``fp32``,
``bf16``, ``fp16``). The default dtype is float32 on the CPU and the checkpoint's own float type on a GPU
(`checkpoint_dtype`, float32 when unknown).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from layerwise.core.errors import LayerwiseError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The torch device `spec` names; refuses devices this machine does not have, naming the fix."""
    shown = "auto" if spec is None else str(spec)
    text = shown.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise LayerwiseError(f"device {shown!r}: MPS (Apple GPU) is not available on this machine; use --device "
                                 "cpu or --device auto")
        return torch.device("mps")
    cuda = _CUDA.fullmatch(text)
    if cuda is None:
        hint = " (did you mean cuda?)" if text == "gpu" else ""
        raise LayerwiseError(f"unknown device {shown!r}{hint}; choose one of {', '.join(DEVICES)}, e.g. --device auto")
    if not torch.cuda.is_available():
        raise LayerwiseError(f"device {shown!r}: CUDA is not available ({_no_cuda_reason()}); use --device cpu or "
                             "--device auto")
    if cuda.group(1) is None:
        return torch.device("cuda")
    index, count = int(cuda.group(1)), torch.cuda.device_count()
    if index >= count:
        visible = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise LayerwiseError(f"device {shown!r}: torch sees {count} CUDA device{'s' if count != 1 else ''} "
                             f"({visible}); choose one of those, or --device cuda")
    return torch.device("cuda", index)


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device,
                  checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """The float type to load and run the model in on `device` (see the module docstring for defaults).

    float16 on the CPU is refused: many CPU kernels have no float16 version or run it far slower than
    float32, and its narrow range (largest value 65504) overflows in activations; bfloat16 has float32's
    range and is allowed.
    """
    if spec is None:
        if device.type == "cpu" or checkpoint_dtype not in DTYPES.values():
            return torch.float32
        assert checkpoint_dtype is not None
        return checkpoint_dtype
    dtype = parse_dtype(spec)
    if dtype == torch.float16 and device.type == "cpu":
        raise LayerwiseError("dtype float16 is refused on the CPU: many CPU kernels lack float16 or run it much "
                             "slower than float32, and its range (max 65504) overflows in activations; use "
                             "--dtype bfloat16 or float32 on the CPU")
    return dtype


def parse_dtype(spec: str | torch.dtype) -> torch.dtype:
    """The float type `spec` names (a name, an alias or a torch dtype), whatever the device."""
    if isinstance(spec, torch.dtype) and spec in DTYPES.values():
        return spec
    shown = str(spec).removeprefix("torch.")
    name = DTYPE_ALIASES.get(shown.strip().lower(), shown.strip().lower())
    if name not in DTYPES:
        aliases = ", ".join(f"{a} = {n}" for a, n in DTYPE_ALIASES.items())
        raise LayerwiseError(f"unknown dtype {shown!r}; choose one of {', '.join(DTYPES)} ({aliases})")
    return DTYPES[name]


def checkpoint_dtype(model_dir: str | os.PathLike | None) -> torch.dtype | None:
    """The float type `model_dir`'s config.json says its weights are in (``dtype``, which transformers 5
    writes, or the older ``torch_dtype``); None when there is no such directory, file or field, or the
    file cannot be read (the loader reports that properly later)."""
    if model_dir is None:
        return None
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str):
            dtype = getattr(torch, value.removeprefix("torch."), None)
            if isinstance(dtype, torch.dtype):
                return dtype
    return None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _no_cuda_reason() -> str:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} is built for CUDA but sees no GPU; check the driver and CUDA_VISIBLE_DEVICES"
