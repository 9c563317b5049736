"""Streaming compression: a model compressed from its safetensors files, one decoder layer in memory at a time,
resumable after a crash.

How it runs. The model is built on the meta device (accelerate's `init_empty_weights`), so it has every
module and shape but no weights. `StreamedModel` implements the driver's `LayerWeights`: before a layer
runs, its tensors are read from the files (`SafetensorsSource`, float32); after it, they go back to the
meta device. The embeddings (and anything else outside the decoder layers except the head) are read only
while the first layer's inputs are captured, with the layers replaced by pass-through placeholders; the
final norm and lm_head are never loaded: no layer-local scorer reads logits (the scorers that do, such as
`sensitivity`'s Fisher pass and `ppl_drop`, are refused here), and they are copied from the source into
the output at the end. Scoring streams the model once (one calibration pass; weight-only scorers read the
layers without activations), quantization streams it again (GPTQ calibrates each layer on the outputs of
the already-quantized layers before it, as in memory), and every finished layer is written to the work
directory at once, then freed. Peak memory is one float32 layer, the calibration activations (a layer's
inputs and outputs), one module's quantization temporaries and, for GPTQ, the layer's Hessians still to
use: modules are quantized one Hessian group at a time, each float weight and Hessian dropped when its
module is done, and the big row-independent steps (reading, RTN, packing, dequantizing) work a bounded
number of rows at a time (docs/RESULTS.md, "Streaming compression", has the measurements).

Bad input. Weight files that do not match their headers (cut short, overwritten) are refused when the
model is opened, naming the file; the tensors outside the layers are checked for NaN and Inf before
anything else runs and each layer as it is read, naming the tensors. Either way (`BadWeights`) the work
directory is removed, since no resumed run could finish, and nothing is written under the output name.

Work directory. Beside the output ``CKPT``, ``.CKPT.partial/`` holds::

    run.json                      the run's arguments and a fingerprint of the model files
    scores.json, plan.json        once computed (not recomputed on resume)
    layers/layer-00003.safetensors  a finished layer's tensors, under their checkpoint names
    layers/layer-00003.json         what quantizing it did (spec and relative error per module)
    hidden-00004.safetensors      with a calibrated method: the inputs of the next layer to quantize
    reference-00004.safetensors   with a method that reads the full-precision stream too (GPTAQ):
                                  the full-precision model's inputs of that layer

Every file is written to a temporary name and renamed, so a file present under its name is complete. A
resumed run (``resume=True``, ``--resume``) refuses different arguments (naming them), then continues
from the first layer whose file is missing, with the saved inputs of that layer; interrupted scoring
restarts scoring. At the end ``model.safetensors`` is assembled tensor by tensor (`write_safetensors`,
byte-identical to ``safetensors.torch.save_file`` of the same tensors) into the checkpoint's temporary
directory, which is renamed into place; the work directory is then removed. The checkpoint is the same
format as an in-memory compression's, and for the same arguments the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from layerwise.core.errors import LayerwiseError
from layerwise.core.types import (
    LayerOutcome,
    Plan,
    QuantSpec,
    read_json,
    write_file_atomic,
    write_json_atomic,
)
from layerwise.model.adapter import decoder_layers, layers_path, nonfinite_message, nonfinite_tensors
from layerwise.model.driver import LayerStep, stream_layers
from layerwise.model.loading import check_causal_config, quiet_transformers
from layerwise.model.placement import Placement
from layerwise.model.shards import BadWeights, PendingTensor, SafetensorsSource, pending, safetensors_dtype
from layerwise.output.checkpoint import install_empty_quantized, unique_state_dict

PARTIAL_FORMAT = "layerwise.partial"
PARTIAL_VERSION = 2  # 2: fitted group sizes and packed zero points (checkpoint format version 2)
RUN_FILE = "run.json"
SCORES_FILE = "scores.json"
PLAN_FILE = "plan.json"
# Stream when the float32 weights exceed this share of the memory available (MemAvailable): compressing
# in memory holds the float32 model plus its quantized copy, the calibration state and transient
# dequantized weights, close to twice the weights at its peak, so above about half it would swap or be killed.
STREAM_FRACTION = 0.4
# Test hook: SIGKILL this process when the quantization pass loads this layer (tests of --resume).
KILL_ENV = "LAYERWISE_TEST_KILL_AT_LAYER"


def partial_dir(out: str | os.PathLike) -> Path:
    """The work directory of a streamed compression into `out`: ``.NAME.partial`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def partial_exists(out: str | os.PathLike) -> LayerwiseError:
    return LayerwiseError(f"{partial_dir(out)} holds an interrupted streamed compression into {out}; pass --resume "
                          "(resume=True) to continue it, or remove the directory to start over")


def available_memory() -> int:
    """Bytes of memory available to a new process (MemAvailable), or the physical memory if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def should_stream(model_dir: Path) -> tuple[bool, str]:
    """The streaming rule: float32 weights over `STREAM_FRACTION` of available memory; and why, in words."""
    try:
        size = SafetensorsSource(model_dir).nbytes(4)
    except LayerwiseError:
        return False, f"{model_dir} has no safetensors weights"
    available = available_memory()
    stream = size > STREAM_FRACTION * available
    verdict = "over" if stream else "within"
    return stream, (f"float32 weights {size / 2**30:.1f} GiB, {verdict} {STREAM_FRACTION:.0%} of the "
                    f"{available / 2**30:.1f} GiB available")


class StreamedModel:
    """A causal LM on the meta device whose weights are read from safetensors files as they are needed."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
        self.path = Path(path)
        self.dtype = dtype
        self.source = SafetensorsSource(self.path)
        with quiet_transformers():
            config = AutoConfig.from_pretrained(self.path)
            check_causal_config(config, str(self.path))
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            model.tie_weights()  # on the meta device from_config leaves tied embeddings as two tensors
        self.model = model.eval()
        self.prefix = layers_path(model)
        self.layers = decoder_layers(model)
        self.quantizing = False  # set during the quantization pass (the kill hook's phase)
        self._kill_at = int(os.environ.get(KILL_ENV, "-1"))
        self._outer_loaded: list[str] = []
        # Checkpoint names outside the layers, a tensor shared by several (tied embeddings) under its first
        # name only, as the in-memory `save_checkpoint` writes them; taken before any weight is assigned.
        seen: set[int] = set()
        self._outer_names = []
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not name.startswith(f"{self.prefix}.") and id(tensor) not in seen:
                seen.add(id(tensor))
                self._outer_names.append(name)

    # --------------------------------------------------------------------- the driver's LayerWeights
    def load_outer(self) -> None:
        """Everything outside the decoder layers except lm_head: the embeddings, for capturing inputs."""
        head = self.model.get_output_embeddings()
        head_names = {f"{n}." for n, m in self.model.named_modules() if head is not None and m is head}
        names = [n for n in self._tensor_names(self.model, outside_layers=True)
                 if n in self.source and not any(n.startswith(h) for h in head_names)]
        self._assign(self.model, self.source.read(names, self.dtype))
        self._outer_loaded = names

    def release_outer(self) -> None:
        self._to_meta(self.model, self._outer_loaded)
        self._outer_loaded = []

    def load(self, index: int) -> nn.Module:
        if self.quantizing and index == self._kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        layer = self.layers[index]
        names = [n for n in self._tensor_names(layer) if f"{self.prefix}.{index}.{n}" in self.source]
        state = self.source.read([f"{self.prefix}.{index}.{n}" for n in names], self.dtype)
        self._check_finite(state)
        self._assign(layer, {n: state[f"{self.prefix}.{index}.{n}"] for n in names})
        leftover = [n for n, t in self._named_tensors(layer) if t.device.type == "meta"]
        if leftover:
            raise LayerwiseError(f"{self.path}: layer {index} lacks tensors {leftover[:5]}; the model is incomplete")
        return layer

    def release(self, index: int) -> None:
        """Back to the meta device: every parameter, and every buffer the files provided or quantization made
        (buffers the model computes itself, such as rotary frequencies, stay)."""
        from layerwise.quant import QuantLinear

        layer = self.layers[index]
        names = []
        for module_name, module in layer.named_modules():
            prefix = f"{module_name}." if module_name else ""
            names += [prefix + a for a, p in module._parameters.items() if p is not None]
            names += [prefix + a for a, b in module._buffers.items() if b is not None and (
                isinstance(module, QuantLinear) or f"{self.prefix}.{index}.{prefix}{a}" in self.source)]
        self._to_meta(layer, names)

    def check_outer(self) -> None:
        """Refuse NaN or Inf in the tensors outside the decoder layers (embeddings, final norm, head), read
        one at a time; the layers are checked as they are read (`load`)."""
        for name in self._outer_names:
            if name in self.source:
                self._check_finite(self.source.read([name], self.dtype))

    # ------------------------------------------------------------------------------------- helpers
    def _check_finite(self, tensors: dict[str, torch.Tensor]) -> None:
        bad = nonfinite_tensors(tensors.items())
        if bad:
            raise BadWeights(nonfinite_message(str(self.path), bad))

    def _tensor_names(self, root: nn.Module, outside_layers: bool = False) -> list[str]:
        names = [n for n, _ in self._named_tensors(root)]
        if outside_layers:
            names = [n for n in names if not n.startswith(f"{self.prefix}.")]
        return names

    @staticmethod
    def _named_tensors(root: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]

    @staticmethod
    def _assign(root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            module_name, _, attr = name.rpartition(".")
            module = root.get_submodule(module_name)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[attr] = tensor

    @staticmethod
    def _to_meta(root: nn.Module, names: list[str]) -> None:
        for name in names:
            module_name, _, attr = name.rpartition(".")
            module = root.get_submodule(module_name)
            if attr in module._parameters and module._parameters[attr] is not None:
                module._parameters[attr] = nn.Parameter(module._parameters[attr].to("meta"), requires_grad=False)
            elif module._buffers.get(attr) is not None:
                module._buffers[attr] = module._buffers[attr].to("meta")

    # ------------------------------------------------------------------------------- the checkpoint
    def outer_tensors(self) -> list[PendingTensor]:
        """Every checkpoint tensor outside the decoder layers, read from the files (in `dtype`) when written.

        A tensor shared by several names (tied embeddings) is written once, under its first name, as
        the in-memory `save_checkpoint` does.
        """
        out = []
        state = self.model.state_dict(keep_vars=True)
        for name in self._outer_names:
            tensor = state[name]
            if name in self.source:
                info = self.source.tensors[name]
                out.append(PendingTensor(name, safetensors_dtype(self.dtype), info.shape,
                                         _source_reader(self.source, name, self.dtype)))
            elif tensor.device.type != "meta":
                out.append(pending(name, tensor.detach()))
            else:
                raise LayerwiseError(f"{self.path}: the weight files lack tensor {name}; the model is incomplete")
        return out


def _source_reader(source: SafetensorsSource, name: str, dtype: torch.dtype):
    return lambda: source.read([name], dtype)[name]


# ------------------------------------------------------------------------------------------- work directory
class WorkDir:
    """The `partial_dir` of one output: run arguments, scores, plan, finished layers, saved inputs."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = partial_dir(out)
        self.layers = self.path / "layers"

    def exists(self) -> bool:
        return self.path.is_dir()

    def start(self, run: dict[str, Any], resume: bool) -> bool:
        """Create the directory, or check a resumed one against `run`; True when resuming."""
        if self.exists() and not resume:
            raise partial_exists(self.out)
        if self.exists():
            saved = read_json(self.path / RUN_FILE, "run") if (self.path / RUN_FILE).is_file() else None
            if saved is not None:
                differ = _differences(saved, run)
                if differ:
                    raise LayerwiseError(
                        f"cannot resume {self.path}: it was started with different arguments ({'; '.join(differ)}); "
                        "run again with the same arguments, or remove the directory to start over"
                    )
                for tmp in self.path.rglob(".*.tmp-*"):  # half-written files of the interrupted run
                    tmp.unlink(missing_ok=True)
                return True
        self.layers.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / RUN_FILE, run)
        return False

    def layer_file(self, index: int) -> Path:
        return self.layers / f"layer-{index:05d}.safetensors"

    def outcome_file(self, index: int) -> Path:
        return self.layers / f"layer-{index:05d}.json"

    def hidden_file(self, index: int) -> Path:
        return self.path / f"hidden-{index:05d}.safetensors"

    def reference_file(self, index: int) -> Path:
        return self.path / f"reference-{index:05d}.safetensors"

    def resume_point(self, n_layers: int, calibrated: bool, reference: bool = False) -> int:
        """The first layer to quantize: every layer before it finished, and (calibrated) its inputs saved,
        with (`reference`) the full-precision stream's."""
        done = 0
        while done < n_layers and self.layer_file(done).is_file() and self.outcome_file(done).is_file():
            done += 1
        if calibrated:
            while done > 0 and not (done == n_layers or (self.hidden_file(done).is_file() and (
                    not reference or self.reference_file(done).is_file()))):
                done -= 1
        return done

    def save_layer(self, step: LayerStep, prefix: str, outcome: LayerOutcome, calibrated: bool, last: bool) -> None:
        """A finished layer's tensors and outcome; then (calibrated) the next layer's inputs."""
        index = step.index
        state = {f"{prefix}.{index}.{n}": t for n, t in unique_state_dict(step.layer).items()}
        write_file_atomic(self.layer_file(index),
                          lambda tmp: safetensors.torch.save_file(state, tmp, metadata={"format": "pt"}))
        write_json_atomic(self.outcome_file(index), _outcome_to_dict(outcome))
        if calibrated and not last:
            assert step.outputs is not None
            if step.reference_outputs is not None:
                reference = {str(i): h.contiguous() for i, h in enumerate(step.reference_outputs)}
                write_file_atomic(self.reference_file(index + 1),
                                  lambda tmp: safetensors.torch.save_file(reference, tmp))
            hidden = {str(i): h.contiguous() for i, h in enumerate(step.outputs)}
            write_file_atomic(self.hidden_file(index + 1), lambda tmp: safetensors.torch.save_file(hidden, tmp))
        self.hidden_file(index).unlink(missing_ok=True)
        self.reference_file(index).unlink(missing_ok=True)

    def load_hidden(self, index: int) -> list[torch.Tensor]:
        return _load_batches(self.hidden_file(index))

    def load_reference(self, index: int) -> list[torch.Tensor]:
        return _load_batches(self.reference_file(index))

    def outcomes(self, n_layers: int) -> list[LayerOutcome]:
        return [_outcome_from_dict(json.loads(self.outcome_file(i).read_text()))
                for i in range(n_layers)]

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def replay_inputs(streamed: StreamedModel, windows: torch.Tensor, plan: Plan, method: str, grid: str, work: WorkDir,
                  first: int, *, placement: Placement | None = None,
                  reference: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The inputs of layer `first` on `windows` (and, with `reference`, the full-precision stream's), made again by
    running layers 0..`first`-1 as the work directory holds them, quantized (and as read, in full precision,
    for the reference stream).

    What a rank of a process group resumes from: only rank 0 writes the work directory, and each rank's
    windows are its own share, so no rank's inputs are on disk. The layers run exactly as they did when they
    were quantized (`apply_plan` runs each quantized layer with dense weights to make the next inputs), so the
    inputs are the ones an uninterrupted run would have had.
    """
    from layerwise.quant import dense_weights

    steps = stream_layers(streamed.model, windows, progress=False, weights=streamed, placement=placement,
                          reference=reference)
    try:
        for step in steps:
            if step.index == first:
                return list(step.inputs), (list(step.reference) if reference and step.reference is not None
                                           else None)
            layer, action = step.layer, plan.layers[step.index]
            if reference:
                assert step.reference is not None
                step.reference_outputs = step.kept([step.keep(step.forward(h)) for h in step.reference])
            install_empty_quantized(layer, action, streamed.dtype, default_method=method, default_grid=grid)
            saved = safetensors.torch.load_file(work.layer_file(step.index), device=str(
                next(layer.parameters()).device))
            head = f"{streamed.prefix}.{step.index}."
            layer.load_state_dict({k.removeprefix(head): v for k, v in saved.items()}, strict=False, assign=True)
            with dense_weights(layer.modules()):
                step.outputs = step.run()
    finally:
        steps.close()
    raise ValueError(f"layer {first} is past the model's last layer")


def _load_batches(file: Path) -> list[torch.Tensor]:
    tensors = safetensors.torch.load_file(file)
    return [tensors[str(i)] for i in range(len(tensors))]


def _outcome_to_dict(outcome: LayerOutcome) -> dict[str, Any]:
    return {"layer": outcome.layer, "specs": {n: None if s is None else s.to_dict() for n, s in outcome.specs.items()},
            "errors": outcome.errors, "sq_norms": outcome.sq_norms}


def _outcome_from_dict(data: dict[str, Any]) -> LayerOutcome:
    specs = {n: None if s is None else QuantSpec(**s) for n, s in data["specs"].items()}
    return LayerOutcome(data["layer"], specs, data["errors"], data["sq_norms"])


def _differences(saved: dict[str, Any], run: dict[str, Any]) -> list[str]:
    if saved.get("format") != PARTIAL_FORMAT or saved.get("version") != PARTIAL_VERSION:
        return [f"work directory format {saved.get('format')!r} version {saved.get('version')!r}"]
    out = []
    for key in sorted(set(saved["args"]) | set(run["args"])):
        if saved["args"].get(key) != run["args"].get(key):
            out.append(f"{key}: {saved['args'].get(key)!r} then, {run['args'].get(key)!r} now")
    if saved.get("source") != run.get("source"):
        out.append(f"the model files of {run.get('model')} changed since")
    return out
