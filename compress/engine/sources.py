"""Weight sources of the pipeline: where the model's weights come from during a run.

`ResidentSource`: a model in memory (given, or loaded from a directory, a hub id or the default alias).
`StreamedSource`: safetensors files read one decoder layer at a time (`layerwise.engine.streaming.StreamedModel`);
the model lives on the meta device and the driver loads and releases each layer through `layer_weights`.

The pipeline asks a source for the model, its tokenizer and name, the `LayerWeights` the driver streams
through (None when every layer is resident), and what the source cannot do (`refusal`), before any work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerwise.core.errors import LayerwiseError
from layerwise.engine.recipe import Recipe
from layerwise.importance import SCORERS
from layerwise.model.adapter import check_causal_lm, check_finite_weights
from layerwise.model.device import checkpoint_dtype
from layerwise.model.driver import LayerWeights
from layerwise.model.loading import load_model, model_name, quiet_transformers
from layerwise.transform import AUTO


class ResidentSource:
    """Every weight in memory: a model object, or one loaded here in float32 on the CPU."""

    resident = True

    def __init__(self, model_or_path: nn.Module | str | None, tokenizer: Any = None) -> None:
        self._given = model_or_path
        self.tokenizer = tokenizer
        self.model: nn.Module | None = None
        self.name = ""

    def refusal(self, recipe: Recipe) -> str | None:
        return None

    def checkpoint_dtype(self) -> torch.dtype | None:
        """The dtype of the weights as given: the model's own, or what its directory's config says."""
        if isinstance(self._given, nn.Module):
            return next(self._given.parameters()).dtype
        from layerwise.model.loading import local_model_dir

        return checkpoint_dtype(local_model_dir(self._given))

    def open(self, dtype: torch.dtype = torch.float32) -> None:
        """Load (or check) the model: refuses non-causal models and NaN/Inf weights, naming the tensors.

        A model loaded here is loaded in `dtype`; a model object is used as it is (each layer is cast
        when it is placed on the device)."""
        given = self._given
        if isinstance(given, nn.Module):
            self.name = getattr(getattr(given, "config", None), "_name_or_path", "") or type(given).__name__
            check_causal_lm(given)
            check_finite_weights(given, self.name)
            self.model = given
            return
        model, tokenizer = load_model(given, dtype)
        self.name = model_name(given)
        check_finite_weights(model, self.name)
        self.model, self.tokenizer = model, self.tokenizer or tokenizer

    @property
    def layer_weights(self) -> LayerWeights | None:
        return None

    @property
    def element_bytes(self) -> int:
        """Bytes per weight of the model as given (what the report counts as 'before')."""
        assert self.model is not None
        return next(self.model.parameters()).element_size()


class StreamedSource:
    """A model directory read one decoder layer at a time; `why` says why the run streams (for messages)."""

    resident = False

    def __init__(self, model_dir: str | os.PathLike, name: str, why: str = "streaming") -> None:
        self.path = Path(model_dir)
        self.name = name
        self.why = why
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.streamed: Any = None

    def refusal(self, recipe: Recipe) -> str | None:
        """What a streamed run cannot do with this recipe, as the error to raise (None: it can)."""
        if not recipe.structure.empty:
            return (f"{self.why} cannot prune, drop or tie layers yet; compress without streaming "
                    "(stream=False, --no-stream) or without the structural options")
        if recipe.rotate not in (None, AUTO):  # auto chooses no rotation when streaming
            return (f"{self.why} cannot rotate yet (the embeddings, the head and every layer would be rewritten as "
                    "they are read); compress without streaming (stream=False, --no-stream) or without --rotate")
        if recipe.scoring and not SCORERS.get(recipe.scorer).layer_local:
            local = [n for n in SCORERS.names() if SCORERS.get(n).layer_local]
            return (f"{self.why} cannot use scorer {recipe.scorer!r}, which needs the whole model in memory; use "
                    f"{', '.join(local)} (--scorer), uniform bits (--uniform), or stream=False (--no-stream)")
        return None

    def checkpoint_dtype(self) -> torch.dtype | None:
        return checkpoint_dtype(self.path)

    def open(self, dtype: torch.dtype = torch.float32) -> None:
        """Build the model on the meta device (its layers read in `dtype`); check the tensors outside the
        layers for NaN/Inf."""
        from transformers import AutoTokenizer

        from layerwise.engine.streaming import StreamedModel

        self.streamed = StreamedModel(self.path, dtype)
        self.streamed.check_outer()  # the layers are checked as they are read
        self.model = self.streamed.model
        if (self.path / "tokenizer_config.json").is_file():
            with quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(self.path)

    @property
    def layer_weights(self) -> LayerWeights | None:
        return self.streamed

    @property
    def element_bytes(self) -> int:
        return self.streamed.dtype.itemsize  # the dtype the layers are read in

    def fingerprint(self) -> list[list]:
        return self.streamed.source.fingerprint()


def check_source(source: ResidentSource | StreamedSource, recipe: Recipe) -> None:
    refusal = source.refusal(recipe)
    if refusal is not None:
        raise LayerwiseError(refusal)
