"""An output never overlaps an input: the one rule every writer checks before any work.

`layerwise compress DIR --out DIR --overwrite` would otherwise replace the user's original model with
its compressed copy. `check_not_inside` refuses an output path that is, contains, or lies inside an input
(symlinks and ``..`` resolved), whatever --overwrite says. Inputs are paths or model names: the default
alias stands for its cache directory, a hub id for its folder in the Hugging Face cache, a model object
for the directory it was loaded from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from layerwise.core.errors import LayerwiseError


def input_path(spec: object) -> Path | None:
    """The file or directory input `spec` reads, without loading, converting or downloading anything.

    None or the alias: the default model's cache directory (whether converted yet or not). An existing
    path: itself. A hub id: its folder in the Hugging Face cache, if there is one. A model object: the
    directory in its config's ``_name_or_path``, if that exists. Anything else: None.
    """
    from layerwise.model.loading import DEFAULT_ALIAS, default_cache_path

    if spec is None or isinstance(spec, str | os.PathLike):
        text = None if spec is None else os.fsdecode(spec)
        if text is None or text == DEFAULT_ALIAS:
            return default_cache_path()
        path = Path(text).expanduser()
        if text and path.exists():
            return path
        return _hub_cache_folder(text) if text else None
    source = getattr(getattr(spec, "config", None), "_name_or_path", None)
    return Path(source).expanduser() if isinstance(source, str) and source and Path(source).is_dir() else None


def check_not_inside(out: str | os.PathLike, inputs: Iterable[object], kind: str = "model") -> None:
    """Refuse `out` if it is, contains, or lies inside one of `inputs` (see `input_path`); `kind` names
    the inputs in the message (model, checkpoint, scores file, ...)."""
    target = Path(out).expanduser().resolve()
    for spec in inputs:
        source = input_path(spec)
        if source is None:
            continue
        source = source.resolve()
        if target == source:
            relation, harm = "is", "writing it would replace the input (--overwrite does not allow that)"
        elif target in source.parents:
            relation, harm = "contains", "writing it would delete the input (--overwrite does not allow that)"
        elif source in target.parents:
            relation, harm = "lies inside", "writing there would modify the input"
        else:
            continue
        raise LayerwiseError(f"output {out} {relation} the input {kind} {source}; {harm}; choose an output path "
                             f"outside {source}")


def _hub_cache_folder(repo_id: str) -> Path | None:
    """Where the hub client keeps `repo_id` (``HF_HUB_CACHE/models--org--name``), if it holds it."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    return folder if folder.is_dir() else None
