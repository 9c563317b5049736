"""Shared by the eval tests: a cache of one's own (for damaging task data safely) and a tiny model in memory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from layerwise.core.cache import ENV_VAR, cache_dir

# ppl by a protocol a tiny model can afford: 4 windows of 64 tokens.
SMALL_PPL = ["--max-tokens", "256", "--window", "64"]


def use_private_cache(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$LAYERWISE_CACHE at `root`, seeded with the cleaned Wikipedia corpus (saves a rebuild)."""
    corpus = cache_dir() / "corpora"
    if corpus.is_dir():
        shutil.copytree(corpus, root / "corpora")
    monkeypatch.setenv(ENV_VAR, str(root))
    return root


def load_tiny(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
