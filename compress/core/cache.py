"""Where layerwise keeps things that are slow to rebuild: converted models, cleaned corpora.

One directory for everything, so a user can see (and delete) it at once. ``$LAYERWISE_CACHE`` moves it,
e.g. to a bigger disk or to a per-test temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LAYERWISE_CACHE"


def cache_dir() -> Path:
    """The cache root (``$LAYERWISE_CACHE`` or ``~/.cache/layerwise``), created if missing.

    Read at every call rather than at import, so tests can point it elsewhere with ``monkeypatch.setenv``.
    """
    root = os.environ.get(ENV_VAR)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "layerwise"
    path.mkdir(parents=True, exist_ok=True)
    return path
