"""Pruning and tying on the default model: perplexity vs layers removed, and quantize vs prune vs tie
at equal size.

Default model (SmolLM2-135M-Instruct, fp32, 30 layers), default protocol (wiki-16k-w1024), 64
calibration windows of 512 tokens (the library default).

  layers      perplexity after removing 0..10 layers, for each structural scorer: lim (ShortGPT's Block
              Influence ranking), angular (lowest distance per layer), angular-block (the best
              contiguous block, Gromov et al.), ppl_drop (greedy calibration loss, SLEB-like), and the
              tie scorer removing layers by tying them to a neighbour (first and average modes).
  equal-size  at the size of uniform 2-, 3- and 4-bit GPTQ (group 128; average bits per original decoder
              weight, overhead included): uniform GPTQ at that width; prune k layers + uniform GPTQ one
              width up (8 bits above 4) with k the fewest that fit; tie k layers + the same; prune only,
              the rest kept in fp16 (16 bits a weight).

Each finished run is written to the JSON at once and skipped on a rerun, so the script resumes.

    python benchmarks/prune.py --part layers --out benchmarks/results/prune.json
    python benchmarks/prune.py --part equal-size --out benchmarks/results/prune.json
    python benchmarks/prune.py --report benchmarks/results/prune.json --plot docs/prune.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from layerwise.api import apply
from layerwise.core.budget import average_bits
from layerwise.core.types import LayerAction, LayerScores, Plan
from layerwise.data.corpora import DEFAULT_CALIB_LEN, DEFAULT_CALIB_WINDOWS, calibration_windows
from layerwise.engine.applier import apply_structure
from layerwise.eval import DEFAULT_PROTOCOL, perplexity
from layerwise.importance import score_model
from layerwise.model.adapter import layer_linear_shapes
from layerwise.model.loading import load_model
from layerwise.planning.planners import uniform_plan
from layerwise.planning.structure import StructureConfig, plan_structure

MAX_REMOVED = 10
CURVES = ("lim", "angular", "angular-block", "ppl_drop", "tie-first", "tie-average")
SIZES = (2, 3, 4)
NEXT_WIDTH = {2: 3, 3: 4, 4: 8}
GROUP_SIZE = 128
# The equal-size runs prune and tie the way that did best in part `layers`.
BEST_PRUNE = "ppl_drop"
BEST_TIE_MODE = "first"


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"layers": {}, "equal_size": {}}


def save_results(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def _structure(curve: str, n: int) -> StructureConfig:
    if curve.startswith("tie-"):
        return StructureConfig(tie=n, tie_mode=curve.removeprefix("tie-"))
    return StructureConfig(prune=n, block=curve == "angular-block")


def _scorer(curve: str) -> str:
    return "tie" if curve.startswith("tie-") else curve.removesuffix("-block")


def run_layers(results: dict, out: Path, windows: torch.Tensor, curves: list[str], counts: list[int],
               ppl_drop_windows: int | None = None) -> None:
    model, tokenizer = load_model(None)
    n_layers = len(layer_linear_shapes(model))
    # Scores saved by an earlier (interrupted) run are reused: a rerun only evaluates what is missing.
    scores = {name: LayerScores.from_dict(data) for name, data in results.get("scores", {}).items()}
    for curve in curves:
        runs = results["layers"].setdefault(curve, {})
        for n in counts:
            if str(n) in runs:
                continue
            name = _scorer(curve)
            if name not in scores:
                options = {"ppl_drop": {"windows": ppl_drop_windows}} if ppl_drop_windows else {}
                scores[name] = score_model(model, [name], windows, model_name="smollm2-135m",
                                           scorer_options=options)[name]
                results.setdefault("scores", {})[name] = scores[name].to_dict()
            config = _structure(curve, n)
            role = "tie" if config.tie else "prune"
            actions = plan_structure(n_layers, config, **{f"{role}_scores": scores[name]})
            fresh, _ = load_model(None)
            apply_structure(fresh, Plan(actions), config.tie_mode)
            ppl = perplexity(fresh, tokenizer, DEFAULT_PROTOCOL).perplexity
            removed = [a.layer for a in actions if a.removed]
            runs[str(n)] = {"perplexity": ppl, "removed": removed}
            print(f"{curve:14s} n={n:2d} ppl={ppl:10.3f} removed={removed}", flush=True)
            save_results(out, results)


def _fit_count(shapes, width: int, size_bits: float, keep_bits: float | None = None) -> int:
    """Fewest layers to remove so the rest at `width` (or kept at 16 bits) cost at most `size_bits`."""
    n_layers = len(shapes)
    per_layer = (keep_bits or uniform_plan(shapes, width, GROUP_SIZE).avg_bits) / n_layers
    return max(0, math.ceil(n_layers - size_bits / per_layer - 1e-9))


def _structured_uniform(n_layers: int, config: StructureConfig, scores: LayerScores, bits: int | None) -> Plan:
    """The structural plan of `config`, with every layer that keeps weights of its own at `bits` (or kept)."""
    role = "tie" if config.tie else "prune"
    actions = plan_structure(n_layers, config, **{f"{role}_scores": scores})  # type: ignore[arg-type]
    if bits is not None:
        actions = [a if a.removed else LayerAction(a.layer, "quantize", bits, GROUP_SIZE) for a in actions]
    return Plan(actions)


def run_equal_size(
    results: dict, out: Path, windows: torch.Tensor, prune_scorer: str = BEST_PRUNE, only: str | None = None
) -> None:
    """Uses the scores the `layers` part saved, so run that part first."""
    model, tokenizer = load_model(None)
    shapes = layer_linear_shapes(model)
    n_layers = len(shapes)
    saved = {name: LayerScores.from_dict(data) for name, data in results.get("scores", {}).items()}
    prune_scores, tie_scores = saved.get(prune_scorer), saved.get("tie")
    for bits in SIZES:
        size = uniform_plan(shapes, bits, GROUP_SIZE).avg_bits
        wider = NEXT_WIDTH[bits]
        k_quant = _fit_count(shapes, wider, size)
        k_fp16 = _fit_count(shapes, wider, size, keep_bits=16.0)
        runs = {
            f"uniform-{bits}b": (StructureConfig(), LayerScores("none", [0.0] * n_layers, shapes), bits),
            f"prune{k_quant}+uniform-{wider}b": (StructureConfig(prune=k_quant), prune_scores, wider),
            f"tie{k_quant}+uniform-{wider}b": (StructureConfig(tie=k_quant, tie_mode=BEST_TIE_MODE), tie_scores, wider),
            f"prune{k_fp16}-fp16": (StructureConfig(prune=k_fp16), prune_scores, None),
        }
        cell = results["equal_size"].setdefault(str(bits), {"size_bits": size})
        for label, (config, scores, width) in runs.items():
            if label in cell or (only and not label.startswith(only)):
                continue
            if scores is None:
                print(f"size {bits}b: {label}: skipped, run part `layers` first for its scores", flush=True)
                continue
            plan = _structured_uniform(n_layers, config, scores, width)
            fresh, _ = load_model(None)
            result = apply(fresh, plan, "gptq", tokenizer=tokenizer, calib=windows, tie_mode=config.tie_mode,
                           progress=False)
            avg = average_bits(plan.layers, shapes)  # kept fp layers count 16 bits a weight
            ppl = perplexity(result.model, tokenizer, DEFAULT_PROTOCOL).perplexity
            cell[label] = {"perplexity": ppl, "avg_bits": avg, "removed": [a.layer for a in plan.layers if a.removed],
                           "scorer": scores.scorer}
            print(f"size {bits}b ({size:.3f}): {label:24s} bits={avg:.3f} ppl={ppl:.3f}", flush=True)
            save_results(out, results)


def report(results: dict, plot: str | None) -> str:
    lines = ["| layers removed | " + " | ".join(CURVES) + " |", "|---" * (len(CURVES) + 1) + "|"]
    for n in range(MAX_REMOVED + 1):
        runs = [results["layers"].get(c, {}).get(str(n)) for c in CURVES]
        cells = ["-" if run is None else f"{run['perplexity']:,.2f}" for run in runs]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "| size of | run | avg bits | perplexity |", "|---|---|---|---|"]
    for bits, cell in sorted(results.get("equal_size", {}).items()):
        for label, run in cell.items():
            if isinstance(run, dict):
                lines.append(f"| uniform {bits}-bit ({cell['size_bits']:.3f}) | {label} | {run['avg_bits']:.3f} | "
                             f"{run['perplexity']:,.2f} |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for curve in CURVES:
            runs = results["layers"].get(curve, {})
            xs = sorted(int(n) for n in runs)
            ax.plot(xs, [runs[str(x)]["perplexity"] for x in xs], marker="o", label=curve)
        ax.set_yscale("log")
        ax.set_xlabel("decoder layers removed (of 30)")
        ax.set_ylabel(f"perplexity ({DEFAULT_PROTOCOL.name})")
        ax.set_title("SmolLM2-135M-Instruct: pruning and tying")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["layers", "equal-size"], default=None)
    parser.add_argument("--out", default="benchmarks/results/prune.json")
    parser.add_argument("--curves", default=",".join(CURVES), help="part layers: which curves")
    parser.add_argument("--removed", default=f"0-{MAX_REMOVED}", help="part layers: layer counts, e.g. 0-10 or 1,3,5")
    parser.add_argument("--ppl-drop-windows", type=int, default=None,
                        help="part layers: calibration windows of ppl_drop (default: the scorer's, 16)")
    parser.add_argument("--prune-scorer", default=BEST_PRUNE, help="part equal-size: the scorer that prunes")
    parser.add_argument("--only", default=None, help="part equal-size: only runs whose label starts so (e.g. prune)")
    parser.add_argument("--report", default=None, help="print the tables of this results JSON")
    parser.add_argument("--plot", default=None, help="with --report: write the PNG here")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(Path(args.report).read_text()), args.plot))
        return
    if args.part is None:
        parser.error("give --part or --report")
    out = Path(args.out)
    results = load_results(out)
    _, tokenizer = load_model(None)
    windows = calibration_windows(tokenizer, "wikipedia", DEFAULT_CALIB_WINDOWS, DEFAULT_CALIB_LEN)
    if args.part == "layers":
        first, _, last = args.removed.partition("-")
        counts = list(range(int(first), int(last) + 1)) if last else [int(n) for n in args.removed.split(",")]
        run_layers(results, out, windows, args.curves.split(","), counts, args.ppl_drop_windows)
    else:
        run_equal_size(results, out, windows, args.prune_scorer, args.only)


if __name__ == "__main__":
    main()
