"""GPU compression of a Llama-3.1-8B-shaped model, one decoder layer on the device at a time (issue 13).

Builds a llama with Llama-3.1-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocabulary
128256) but only `--layers` decoder layers (4 by default), with random bf16 weights made on this machine,
and calibrates on random token windows: no network, tokenizer or corpus. The weights stay on the CPU;
each decoder layer's work runs on `--device` through a `layerwise.model.placement.Placement` (the lower-level
functions are called directly, not `layerwise.compress`). Two runs, each on a freshly built model:

* ``gptq``: GPTQ, every layer at 4 bits, group 128 (`uniform_plan` + `apply_plan`) on `--windows`
  windows of `--len` tokens;
* ``sensitivity``: the default scorer with its default options and GPTQ as the method (what
  ``layerwise compress`` runs by default: `score_model`, Fisher pass and per-layer option runs), the
  ``optimal`` plan at `--bits` (3.25), then GPTQ of that plan (`apply_plan`).

Per decoder layer it records the seconds, the peak device memory (``torch.cuda.max_memory_allocated``,
reset for each layer) and the host's peak RSS so far (``getrusage``), and extrapolates the times to
`--extrapolate-to` (32) layers: the first layer's extra time (capturing the inputs) counted once, the
median of the other layers per layer; the Fisher pass scaled linearly with the layer count (an upper
bound: its embedding and head part does not grow). Results go to ``$OUT/gpu_compress.json`` (``$OUT`` if
set, else `--out`), rewritten after each run so a run cut short keeps what it measured; a table is printed.

    python benchmarks/gpu_compress.py                        # on the GPU machine, 8B shapes (minutes)
    python benchmarks/gpu_compress.py --device cpu --layers 2 --hidden 64 --mlp 128 --heads 4 --kv-heads 2 \\
        --vocab 256 --windows 4 --len 32 --out /tmp/gpu-smoke    # seconds, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

GiB = 2**30
RESULT_FILE = "gpu_compress.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers built (default 4)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=14336, help="MLP intermediate size")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--windows", type=int, default=128, help="calibration windows")
    parser.add_argument("--len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", help="weights and compute dtype (default bfloat16)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per layer forward (the pipeline's 1)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--bits", type=float, default=3.25, help="budget of the sensitivity plan")
    parser.add_argument("--runs", default="gptq,sensitivity", help="which runs, comma-separated")
    parser.add_argument("--extrapolate-to", type=int, default=32, help="layers of the full model (8B: 32)")
    parser.add_argument("--offload", choices=("auto", "yes", "no"), default="auto",
                        help="activations between layers on the CPU (yes), the device (no), or by free memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="result directory when $OUT is not set")
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - {"gptq", "sensitivity"})
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from gptq, sensitivity")
    args.runs = runs
    return args


def out_dir(args: argparse.Namespace) -> Path:
    where = os.environ.get("OUT") or args.out
    if not where:
        raise SystemExit("no result directory: set $OUT or pass --out DIR")
    path = Path(where)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------- the model
def build_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A llama of the given shapes with N(0, 0.02) weights and unit norms, in `dtype` on the CPU.

    The random numbers are drawn on `device` when it is a GPU (seconds for 2 billion values, where the
    CPU takes a minute) and copied to the CPU, where the weights live during compression.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(8192, args.len),
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    draw = device if device.type == "cuda" else torch.device("cpu")
    generator = torch.Generator(device=draw).manual_seed(args.seed)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if p.dim() >= 2:
                value = torch.empty(p.shape, dtype=dtype, device=draw).normal_(0.0, 0.02, generator=generator)
            else:
                value = torch.ones(p.shape, dtype=dtype, device=draw)
            module._parameters[name] = nn.Parameter(value.cpu(), requires_grad=False)
    return model.eval()


def model_facts(model: nn.Module) -> dict[str, Any]:
    from layerwise.model.adapter import decoder_layers

    layer = decoder_layers(model)[0]
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in layer.parameters())
    element = next(model.parameters()).element_size()
    return {"parameters": total, "parameters_per_layer": per_layer, "bytes": total * element,
            "bytes_per_layer": per_layer * element, "outer_parameters": total - per_layer * len(decoder_layers(model))}


# ------------------------------------------------------------------------------------------- measuring
def host_peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class Clock:
    """Seconds, peak device memory and host peak RSS between successive `mark` calls."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.last = time.perf_counter()

    def mark(self, **extra: Any) -> dict[str, Any]:
        self._sync()
        now = time.perf_counter()
        entry = {**extra, "seconds": round(now - self.last, 3),
                 "peak_gpu_bytes": torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
                 "host_peak_rss_bytes": host_peak_rss()}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.last = time.perf_counter()
        return entry


def extrapolate(layer_seconds: list[float], to_layers: int) -> float | None:
    """Seconds for `to_layers` layers: the first layer's excess (input capture) once, the median otherwise."""
    if not layer_seconds:
        return None
    if len(layer_seconds) == 1:
        return layer_seconds[0] * to_layers
    typical = statistics.median(layer_seconds[1:])
    return round(layer_seconds[0] + typical * (to_layers - 1), 1)


@contextmanager
def timed_sensitivity(clock: Clock, log: dict[str, Any]):
    """A sensitivity scorer that records the Fisher pass and each layer's scoring, registered for the block.

    `score_model` builds scorers by name from `SCORERS`, so the timed subclass is put there for the block
    and taken out again (the registry has no public removal: this script must not leave a name behind).
    """
    from layerwise.importance import SCORERS
    from layerwise.importance.sensitivity import SensitivityScorer

    class TimedSensitivity(SensitivityScorer):
        name = "bench-sensitivity"

        def prepare(self, model, windows, batch_size):
            clock.start()
            super().prepare(model, windows, batch_size)
            log["fisher"] = clock.mark(phase="fisher pass")

        def score_layer(self, step, outputs):
            value = super().score_layer(step, outputs)
            log.setdefault("layers", []).append(clock.mark(layer=step.index))
            return value

    SCORERS.register(TimedSensitivity.name)(TimedSensitivity)
    try:
        yield TimedSensitivity.name
    finally:
        SCORERS._items.pop(TimedSensitivity.name, None)


# ------------------------------------------------------------------------------------------- the runs
def run_gptq(args, placement, windows, clock: Clock) -> dict[str, Any]:
    from layerwise.engine.applier import apply_plan
    from layerwise.model.adapter import layer_linear_shapes
    from layerwise.planning.planners import uniform_plan

    model = build_model(args, placement.dtype, placement.device)
    facts = model_facts(model)
    plan = uniform_plan(layer_linear_shapes(model), 4, args.group_size, method="gptq")
    layers: list[dict[str, Any]] = []
    clock.start()
    start = time.perf_counter()
    outcomes = apply_plan(model, plan, "gptq", windows=windows, batch_size=args.batch_size, progress=False,
                          placement=placement, on_layer=lambda step, _: layers.append(clock.mark(layer=step.index)))
    total = time.perf_counter() - start
    del model
    return {"plan": f"uniform 4-bit, group {args.group_size}, gptq", "model": facts, "layers": layers,
            "seconds": round(total, 2), "avg_bits": plan.avg_bits,
            "relative_errors": [o.layer_error() for o in outcomes],
            "extrapolated_seconds": extrapolate([e["seconds"] for e in layers], args.extrapolate_to)}


def run_sensitivity(args, placement, windows, clock: Clock) -> dict[str, Any]:
    from layerwise.engine.applier import apply_plan
    from layerwise.importance import score_model
    from layerwise.planning.planners import make_plan

    model = build_model(args, placement.dtype, placement.device)
    log: dict[str, Any] = {}
    start = time.perf_counter()
    with timed_sensitivity(clock, log) as name:
        scores = score_model(model, [name], windows, scorer_options={name: {"method": "gptq"}},
                             batch_size=args.batch_size, progress=False, placement=placement)[name]
    score_seconds = time.perf_counter() - start
    plan = make_plan(scores, args.bits, planner="optimal")
    apply_layers: list[dict[str, Any]] = []
    clock.start()
    start = time.perf_counter()
    apply_plan(model, plan, "gptq", windows=windows, batch_size=args.batch_size, progress=False, placement=placement,
               on_layer=lambda step, _: apply_layers.append(clock.mark(layer=step.index)))
    apply_seconds = time.perf_counter() - start
    del model
    fisher = log.get("fisher", {}).get("seconds")
    layer_seconds = [e["seconds"] for e in log.get("layers", [])]
    extrapolated_scoring = None
    if fisher is not None and layer_seconds:
        per_layers = extrapolate(layer_seconds, args.extrapolate_to)
        assert per_layers is not None
        extrapolated_scoring = round(fisher * args.extrapolate_to / args.layers + per_layers, 1)
    return {"scorer": "sensitivity (default options, gptq)", "fisher": log.get("fisher"),
            "score_layers": log.get("layers", []), "score_seconds": round(score_seconds, 2),
            "plan": {"bits": args.bits, "avg_bits": plan.avg_bits,
                     "layers": [a.spec().option() if a.spec() is not None else a.action for a in plan.layers]},
            "apply_layers": apply_layers, "apply_seconds": round(apply_seconds, 2),
            "extrapolated_score_seconds": extrapolated_scoring,
            "extrapolated_apply_seconds": extrapolate([e["seconds"] for e in apply_layers], args.extrapolate_to)}


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "host": platform.node(),
                            "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory)
    return info


def table(results: dict[str, Any]) -> str:
    """The per-layer numbers as a Markdown table, then the extrapolations."""
    def gib(value: int | None) -> str:
        return "-" if value is None else f"{value / GiB:.2f}"

    rows = ["| run | step | layer | seconds | peak GPU GiB | host peak RSS GiB |", "|---|---|---|---|---|---|"]
    for run, steps in (("gptq", [("gptq", results.get("gptq", {}).get("layers", []))]),
                       ("sensitivity", [("fisher", [results["sensitivity"]["fisher"]]
                                         if results.get("sensitivity", {}).get("fisher") else []),
                                        ("score", results.get("sensitivity", {}).get("score_layers", [])),
                                        ("gptq", results.get("sensitivity", {}).get("apply_layers", []))])):
        for step, entries in steps:
            for e in entries:
                rows.append(f"| {run} | {step} | {e.get('layer', '-')} | {e['seconds']:.2f} | "
                            f"{gib(e['peak_gpu_bytes'])} | {gib(e['host_peak_rss_bytes'])} |")
    n = results["config"]["extrapolate_to"]
    if "gptq" in results:
        rows.append(f"\ngptq uniform 4-bit: {results['gptq']['seconds']} s for {results['config']['layers']} layers, "
                    f"about {results['gptq']['extrapolated_seconds']} s for {n}")
    if "sensitivity" in results:
        s = results["sensitivity"]
        rows.append(f"sensitivity: scoring {s['score_seconds']} s, gptq {s['apply_seconds']} s; about "
                    f"{s['extrapolated_score_seconds']} s + {s['extrapolated_apply_seconds']} s for {n} layers "
                    f"(plan: {s['plan']['avg_bits']:.3f} bits)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from layerwise.model.device import resolve_device, resolve_dtype
    from layerwise.model.placement import Placement

    offload = {"auto": None, "yes": True, "no": False}[args.offload]
    device = resolve_device(args.device)
    placement = Placement(device, resolve_dtype(args.dtype, device, None), offload)
    directory = out_dir(args)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    windows = torch.randint(0, args.vocab, (args.windows, args.len), generator=generator)
    results: dict[str, Any] = {"config": {**vars(args), "placement": {
        "device": str(placement.device), "dtype": str(placement.dtype).removeprefix("torch."),
        "offload_activations": placement.offload_activations}}, "environment": environment(placement.device)}
    clock = Clock(placement.device)
    runners = {"gptq": run_gptq, "sensitivity": run_sensitivity}
    for run in args.runs:
        started = time.perf_counter()
        results[run] = runners[run](args, placement, windows, clock)
        results[run]["wall_seconds"] = round(time.perf_counter() - started, 2)
        (directory / RESULT_FILE).write_text(json.dumps(results, indent=1) + "\n")  # kept if a later run dies
        if placement.device.type == "cuda":
            torch.cuda.empty_cache()
    results["host_peak_rss_bytes"] = host_peak_rss()
    (directory / RESULT_FILE).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"\nwritten to {directory / RESULT_FILE}")
    return results


if __name__ == "__main__":
    main()
