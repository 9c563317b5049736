"""Sinks of the pipeline: where a run's results go as they are made.

`MemorySink`: the model is compressed in place; at the end the checkpoint is written (if an output was
given) by `save_checkpoint`, atomically.

`WorkDirSink`: the work directory of a streamed run (`layerwise.engine.streaming.WorkDir`, ``.OUT.partial/``):
the recipe and model fingerprint, the scores and plan once made, every finished layer and the inputs
of the next one. A resumed run continues from it (after comparing recipes), and the checkpoint is
assembled from it at the end, byte-identical to what `MemorySink` writes for the same recipe.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerwise.core import dist
from layerwise.core.types import LayerOutcome, LayerScores, Plan, read_json
from layerwise.engine.streaming import PLAN_FILE, RUN_FILE, SCORES_FILE, WorkDir, partial_dir, partial_exists
from layerwise.model.driver import LayerStep
from layerwise.model.loading import quiet_transformers
from layerwise.model.shards import BadWeights, read_entries, write_safetensors
from layerwise.output.checkpoint import WEIGHTS_FILE, atomic_dir, check_output_dir, save_checkpoint, write_meta


@dataclass
class ResumePoint:
    """Where quantization starts: the first layer to quantize and, after layer 0, its saved inputs
    (`hidden`) and the full-precision stream's (`reference`, for methods that read it)."""

    first: int = 0
    hidden: list[torch.Tensor] | None = None
    reference: list[torch.Tensor] | None = None
    replay: bool = False  # the inputs of `first` are not saved: run the finished layers again (`replay_inputs`)


class MemorySink:
    """Results stay in the model object; `out` (optional) receives the checkpoint at the end."""

    def __init__(self, out: str | os.PathLike | None, overwrite: bool = False) -> None:
        self.out = None if out is None else Path(out)
        self.overwrite = overwrite

    def check(self) -> None:
        """Refuse an output that exists (without overwrite) or that a streamed run left half-done."""
        if self.out is None:
            return
        check_output_dir(self.out, self.overwrite)
        if partial_dir(self.out).exists():
            raise partial_exists(self.out)

    def start(self, run: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def failed(self, exc: BaseException) -> None:
        pass

    def cached_scores(self) -> LayerScores | None:
        return None

    def cached_plan(self) -> Plan | None:
        return None

    def save_scores(self, scores: LayerScores) -> None:
        pass

    def save_plan(self, plan: Plan) -> None:
        pass

    def resume_point(self, n_layers: int, calibrated: bool, reference: bool = False) -> ResumePoint:
        return ResumePoint()

    def on_layer(self, prefix: str, n_layers: int, calibrated: bool):
        return None

    def outcomes(self, done: list[LayerOutcome], n_layers: int) -> list[LayerOutcome]:
        return done

    def write(self, model, tokenizer, plan: Plan, extra: dict[str, Any], source: Any) -> None:
        """Save the checkpoint (rank 0 of a process group: every rank holds the same model; the others wait)."""
        if self.out is not None and dist.is_main():
            save_checkpoint(model, tokenizer, self.out, plan=plan, extra=extra, overwrite=self.overwrite)
        dist.barrier()

    @property
    def keeps_model(self) -> bool:
        return True


class WorkDirSink:
    """A streamed run's work directory beside `out`; `resume` continues the one there."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> None:
        self.out = Path(out)
        self.overwrite = overwrite
        self.resume = resume
        self.work = WorkDir(self.out)
        self._threads = torch.get_num_threads()

    def check(self) -> None:
        self.out = check_output_dir(self.out, self.overwrite)

    def start(self, run: dict[str, Any]) -> None:
        """Create the work directory, or check the one being resumed against `run` (recipe, model files). In a
        process group rank 0 does, and the others read it once it has (their arguments were compared already)."""
        resumed = self.work.start(run, self.resume) if dist.is_main() else self.resume
        dist.barrier()
        saved = read_json(self.work.path / RUN_FILE, "run").get("torch_threads") if resumed else self._threads
        if isinstance(saved, int) and saved != self._threads:
            # CPU matmul reductions split by thread count: continue with the count the run started with.
            warnings.warn(f"resuming with {saved} torch threads, as the run started (not {self._threads}), so "
                          "that the result matches an uninterrupted run", RuntimeWarning, stacklevel=2)
            torch.set_num_threads(saved)

    def close(self) -> None:
        torch.set_num_threads(self._threads)

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, BadWeights) and dist.is_main():
            self.work.remove()  # a damaged file or a NaN weight: no resumed run could finish this one

    def cached_scores(self) -> LayerScores | None:
        file = self.work.path / SCORES_FILE
        return LayerScores.load(file) if file.is_file() else None

    def cached_plan(self) -> Plan | None:
        file = self.work.path / PLAN_FILE
        return Plan.load(file) if file.is_file() else None

    def save_scores(self, scores: LayerScores) -> None:
        if dist.is_main():
            scores.save(self.work.path / SCORES_FILE)

    def save_plan(self, plan: Plan) -> None:
        if dist.is_main():
            plan.save(self.work.path / PLAN_FILE)

    def resume_point(self, n_layers: int, calibrated: bool, reference: bool = False) -> ResumePoint:
        """Where quantization starts. In a process group the inputs are not saved (each rank's are its own):
        resume after the last finished layer, and make them again from the finished layers (`replay`)."""
        if not dist.is_alone():
            first = self.work.resume_point(n_layers, calibrated=False)
            return ResumePoint(first, replay=calibrated and 0 < first < n_layers)
        first = self.work.resume_point(n_layers, calibrated, reference)
        saved = calibrated and 0 < first < n_layers
        return ResumePoint(first, self.work.load_hidden(first) if saved else None,
                           self.work.load_reference(first) if saved and reference else None)

    def on_layer(self, prefix: str, n_layers: int, calibrated: bool):
        keep_inputs = calibrated and dist.is_alone()

        def save(step: LayerStep, outcome: LayerOutcome) -> None:
            if dist.is_main():
                self.work.save_layer(step, prefix, outcome, keep_inputs, step.index == n_layers - 1)

        return save

    def outcomes(self, done: list[LayerOutcome], n_layers: int) -> list[LayerOutcome]:
        dist.barrier()  # rank 0 has written the last layer's outcome
        return self.work.outcomes(n_layers)  # resumed runs quantized only some layers in this process

    def write(self, model, tokenizer, plan: Plan, extra: dict[str, Any], source: Any) -> None:
        """Assemble the checkpoint from the tensors outside the layers (read from the source files) and the
        finished layers' files, then remove the work directory."""
        if not dist.is_main():
            dist.barrier()
            return
        streamed = source.streamed
        with atomic_dir(self.out) as tmp:
            with quiet_transformers():
                model.config.save_pretrained(tmp)
            entries = streamed.outer_tensors()
            for i in range(len(streamed.layers)):
                entries += read_entries(self.work.layer_file(i))
            write_safetensors(tmp / WEIGHTS_FILE, entries, {"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_meta(tmp, streamed.dtype, plan, extra)
        self.work.remove()
        dist.barrier()

    @property
    def keeps_model(self) -> bool:
        return False
