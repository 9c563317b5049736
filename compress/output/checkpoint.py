"""Checkpoint I/O: a directory with config.json, model.safetensors, layerwise.json and tokenizer files.

Writes go to a hidden temporary directory beside the target, renamed into place at the end, so an
interrupted run never leaves a half checkpoint under the final name. Loading never unpickles
(safetensors only) and validates every tensor against the model the plan describes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import layerwise
from layerwise.core.bitstream import pack_zeros
from layerwise.core.errors import LayerwiseError, write_error
from layerwise.core.types import DEFAULT_GRID, LayerAction, Plan
from layerwise.model.adapter import decoder_layers, linear_modules, linear_shape, set_submodule
from layerwise.quant import QuantLinear

FORMAT = "layerwise.checkpoint"
# Version 2: every module's group size divides its input width (`QuantSpec.fit`) and asymmetric zero points
# are packed at the code width (`bitstream.pack_zeros`). Version 1 (ragged last groups, fp16 zeros) still
# loads: its specs are taken as written and its zeros are packed on the way in, which changes no weight.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "layerwise.json"
WEIGHTS_FILE = "model.safetensors"
_TMP_PREFIX = ".{name}.tmp-"  # + the writing process's pid


@dataclass
class Checkpoint:
    model: nn.Module
    tokenizer: Any
    plan: Plan
    meta: dict[str, Any]


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output before any work is done, unless the user said --overwrite."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LayerwiseError(f"output {out} already exists; choose another path or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise LayerwiseError(f"output {out} exists and is not a directory; remove it or choose another path")
    check_writable(out)
    return out


def check_output_file(out: str | os.PathLike, overwrite: bool) -> Path:
    """`check_output_dir` for an output that is one file (a GGUF export)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LayerwiseError(f"output {out} already exists; choose another path or pass --overwrite")
    if out.is_dir():
        raise LayerwiseError(f"output {out} is a directory; give a file name such as {out / 'model.gguf'}")
    check_writable(out)
    return out


def check_writable(out: Path) -> None:
    """Refuse an output on a read-only filesystem or in a directory we may not write, before any work.

    The checkpoint is written beside `out` (a hidden temporary directory, then a rename), so what counts
    is the nearest directory that exists among `out`'s parents. `os.access` sees a read-only mount even
    for root; a full filesystem is only found when the write fails (see `atomic_dir`).
    """
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.is_dir() and not os.access(parent, os.W_OK):
        raise LayerwiseError(
            f"cannot write {out}: {parent} is {_unwritable_reason(parent)}; choose another output directory"
        )


def _unwritable_reason(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "on a read-only filesystem"
    except OSError:
        pass
    return "not writable by this user"


def unique_state_dict(module: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """State dict with tensors shared between names (tied embeddings, tied layers) stored once (first
    name), contiguous; names starting with a prefix in `exclude` are left out."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in module.state_dict().items():
        if name.startswith(exclude):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    plan: Plan,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the compressed model atomically; `extra` (scores, report, metrics) goes into layerwise.json."""
    out = check_output_dir(out, overwrite)
    with atomic_dir(out) as tmp:
        model.config.save_pretrained(tmp)
        safetensors.torch.save_file(unique_state_dict(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_meta(tmp, next(model.parameters()).dtype, plan, extra)
    return out


def write_meta(directory: Path, dtype: torch.dtype, plan: Plan, extra: dict[str, Any] | None = None) -> None:
    """layerwise.json: format and version, the model's dtype, the plan, `extra`, library versions."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": str(dtype).removeprefix("torch."),
        "plan": plan.to_dict(),
        **(extra or {}),
        "versions": {"layerwise": layerwise.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A fresh hidden directory beside `out` to write into; renamed to `out` when the block succeeds,
    removed when it fails (an exception, Ctrl-C), so `out` never holds half a result.

    A write that fails because the filesystem is full or read-only becomes a LayerwiseError saying so,
    raised after the temporary directory is gone. Temporaries left by a killed run (SIGKILL, power loss)
    are removed by the next write to the same output.
    """
    tmp = out.parent / f"{_TMP_PREFIX.format(name=out.name)}{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        _replace_dir(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = write_error(out, exc)
        if error is not None:
            raise error from None
        raise


def _remove_stale_temporaries(out: Path) -> None:
    """Remove hidden temporaries of `out` whose writing process no longer exists."""
    prefix = _TMP_PREFIX.format(name=out.name)
    for path in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


def _replace_dir(src: Path, dst: Path) -> None:
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)  # put the previous output back rather than leave nothing under the name
        raise
    shutil.rmtree(old, ignore_errors=True)


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise LayerwiseError(f"checkpoint {path} does not exist; check the path")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise LayerwiseError(
            f"{path} is not a layerwise checkpoint (no {META_FILE}); pass a plain HF model directory as MODEL instead"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LayerwiseError(f"{meta_path} is not valid JSON ({exc}); the checkpoint is damaged, rewrite it") from None
    if not isinstance(meta, dict):
        raise LayerwiseError(f"{meta_path} holds a JSON {type(meta).__name__}, not an object; the checkpoint is "
                             "damaged, rewrite it")
    if meta.get("format") != FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
        raise LayerwiseError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r} is unknown; "
            f"this layerwise reads {FORMAT} versions {' and '.join(map(str, READABLE_VERSIONS))} (upgrade layerwise "
            "or rewrite the checkpoint)"
        )
    return meta


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Rebuild the compressed model from its checkpoint; raises LayerwiseError naming any bad tensor."""
    path = Path(path)
    meta = read_meta(path)
    plan = _read_plan(meta, path / META_FILE)
    dtype = getattr(torch, str(meta.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise LayerwiseError(f"{path / META_FILE}: dtype {meta.get('dtype')!r} is not a torch dtype; the checkpoint "
                             "is damaged, rewrite it")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise LayerwiseError(f"{path / 'config.json'} cannot be read ({reason}); the checkpoint is incomplete or "
                             "damaged, rewrite it") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = decoder_layers(model)
    compacted = plan.compact()
    if len(layers) != compacted.n_layers:
        raise LayerwiseError(
            f"{path / META_FILE}: the plan keeps {compacted.n_layers} layers but config.json has {len(layers)}"
        )
    _restructure(model, compacted)
    for action, layer in zip(compacted.layers, layers, strict=True):
        install_empty_quantized(layer, action, dtype, fit=meta["format_version"] >= 2)
    _tie(model, compacted)
    state = _read_weights(path / WEIGHTS_FILE)
    if meta["format_version"] == 1:
        _pack_v1_zeros(model, state)
    _validate_state(model, state, path / WEIGHTS_FILE)
    model.load_state_dict(state, strict=False, assign=True)
    _tie(model, compacted)  # assign=True gave the representatives new tensors: share them again
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    leftover = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if leftover:
        raise LayerwiseError(f"{path / WEIGHTS_FILE} lacks tensors {leftover[:5]}; the checkpoint is incomplete")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return Checkpoint(model, tokenizer, plan, meta)


def install_empty_quantized(layer: nn.Module, action: LayerAction, dtype: torch.dtype, *, fit: bool = True,
                            default_method: str = "rtn", default_grid: str = DEFAULT_GRID) -> None:
    """Replace each linear of `layer` that `action` quantizes by an empty `QuantLinear` of its spec (fitted to
    its width unless `fit` is False: format-1 checkpoints), ready for `load_state_dict`."""
    for name, module in linear_modules(layer).items():
        spec = action.module_spec(name, default_method, default_grid)
        if spec is None:
            continue
        out_f, in_f = linear_shape(module)
        has_bias = getattr(module, "bias", None) is not None
        set_submodule(layer, name, QuantLinear.empty(in_f, out_f, spec.fit(in_f) if fit else spec, bias=has_bias,
                                                     dtype=dtype))


def _read_plan(meta: dict[str, Any], meta_path: Path) -> Plan:
    if not isinstance(meta.get("plan"), dict):
        raise LayerwiseError(f"{meta_path} has no plan; the checkpoint is damaged, rewrite it")
    try:
        return Plan.from_dict(meta["plan"])
    except LayerwiseError as exc:
        raise LayerwiseError(f"{meta_path}: {exc}; the checkpoint is damaged, rewrite it") from None


def _restructure(model: nn.Module, compacted: Plan) -> None:
    """Replace the dropped sub-layers, as `apply_structure` did before the checkpoint was saved."""
    if not any(a.drop for a in compacted.layers):
        return
    from layerwise.prune import drop_sublayer

    for action in compacted.layers:
        for sublayer in action.drop:
            drop_sublayer(model, action.layer, sublayer)


def _tie(model: nn.Module, compacted: Plan) -> None:
    ties = [(a.layer, a.tie_to) for a in compacted.layers if a.action == "tie"]
    if not ties:
        return
    from layerwise.prune import tie_layer

    for layer, to in ties:
        tie_layer(model, layer, to)


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise LayerwiseError(f"{file} is missing; the checkpoint is incomplete, write it again")
    try:
        return safetensors.torch.load_file(file)
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise LayerwiseError(f"{file} cannot be read ({exc}); the file is damaged, rewrite the checkpoint") from None


def _pack_v1_zeros(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Version 1 kept asymmetric zero points as fp16 (N, G) integers; pack them as version 2 stores them."""
    for name, module in model.named_modules():
        key = f"{name}.zeros"
        if isinstance(module, QuantLinear) and module.zeros is not None and key in state:
            if state[key].dtype == torch.float16 and state[key].dim() == 2:
                state[key] = pack_zeros(state[key], module.bits)


def _validate_state(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """Every tensor the model needs is in the file with its shape, and nothing else is.

    A tensor shared by several names (tied layers, tied embeddings) is needed under its first name only,
    which is the one `save_checkpoint` keeps.
    """
    expected = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    required = []
    for name, tensor in expected.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            required.append(name)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    for name in required:
        if name not in state and name not in tied:
            raise LayerwiseError(f"{file}: tensor {name} is missing; the checkpoint is incomplete")
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise LayerwiseError(
                f"{file}: tensor {name} has shape {tuple(tensor.shape)}, the plan needs {tuple(expected[name].shape)}"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise LayerwiseError(f"{file}: unexpected tensors {unexpected[:5]}; the checkpoint does not match its plan")
