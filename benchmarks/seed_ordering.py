"""The seed paper's claim, measured: does ordering layers by importance choose the right ones to squeeze?

On the default model (SmolLM2-135M-Instruct, fp32) with group size 128 (off the GGUF's 32-block grid)
and RTN, k layers go to the low width and the rest stay at the high width, for k = 25 % and 50 % of
the layers and the pairs 4/2, 4/3 and 8/4. Which k layers is decided by:

  lim        LIM order: lowest LIM goes low (the paper's method)
  lim-rev    reverse LIM: highest LIM goes low
  zd         ZD order as the paper ranks it (more weights above one sigma = less important = low first)
  zd-rev     the opposite ZD direction
  random     random order, seeds 0, 1, 2 (median reported)

Perplexity by the protocol in layerwise.eval.DEFAULT_PROTOCOL. Usage:

    python benchmarks/seed_ordering.py --out benchmarks/results/seed_ordering.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

from layerwise.api import make_plan
from layerwise.data.corpora import DEFAULT_CALIB_LEN, DEFAULT_CALIB_WINDOWS, calibration_windows
from layerwise.engine.applier import apply_plan
from layerwise.eval import DEFAULT_PROTOCOL, perplexity
from layerwise.importance import score_model
from layerwise.model.loading import load_model
from layerwise.planning.planners import uniform_plan

PAIRS = ((4, 2), (4, 3), (8, 4))
FRACTIONS = (0.25, 0.5)
SEEDS = (0, 1, 2)


def evaluate(base, tokenizer, plan) -> float:
    model = copy.deepcopy(base)
    apply_plan(model, plan, "rtn", progress=False)
    return perplexity(model, tokenizer, DEFAULT_PROTOCOL, progress=False).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calib-windows", type=int, default=DEFAULT_CALIB_WINDOWS)
    parser.add_argument("--out", default="benchmarks/results/seed_ordering.json")
    args = parser.parse_args()

    base, tokenizer = load_model(args.model)
    start = time.perf_counter()
    windows = calibration_windows(tokenizer, "wikipedia", args.calib_windows, DEFAULT_CALIB_LEN)
    scores = score_model(base, ["lim", "zd"], windows, progress=True)
    n = scores["lim"].n_layers
    results_scores_seconds = time.perf_counter() - start
    results: dict = {
        "model": args.model or "smollm2-135m",
        "group_size": args.group_size,
        "protocol": DEFAULT_PROTOCOL.describe(),
        "scores": {k: v.scores for k, v in scores.items()},
        "scoring_seconds": results_scores_seconds,
        "fp32": perplexity(base, tokenizer, DEFAULT_PROTOCOL, progress=False).perplexity,
        "uniform": {},
        "runs": [],
    }
    print(f"fp32 perplexity {results['fp32']:.3f}")
    for bits in sorted({b for pair in PAIRS for b in pair}):
        plan = uniform_plan(scores["lim"].linear_shapes, bits, args.group_size)
        results["uniform"][bits] = {"avg_bits": plan.avg_bits, "perplexity": evaluate(base, tokenizer, plan)}
        print(f"uniform {bits}-bit: {results['uniform'][bits]}")
    orders = {
        "lim": ("lim", "importance"),
        "lim-rev": ("lim", "reverse"),
        "zd": ("zd", "importance"),
        "zd-rev": ("zd", "reverse"),
    }
    for high, low in PAIRS:
        for fraction in FRACTIONS:
            k = round(fraction * n)
            row = {"high": high, "low": low, "k_low": k, "fraction": fraction}
            for label, (scorer, order) in orders.items():
                plan = make_plan(scores[scorer], None, high=high, low=low, n_low=k, order=order,
                                 group_size=args.group_size)
                row[label] = evaluate(base, tokenizer, plan)
                row["avg_bits"] = plan.avg_bits
            random_ppl = [
                evaluate(base, tokenizer, make_plan(scores["lim"], None, high=high, low=low, n_low=k,
                                                    order="random", seed=s, group_size=args.group_size))
                for s in SEEDS
            ]
            row["random_runs"] = random_ppl
            row["random_median"] = statistics.median(random_ppl)
            results["runs"].append(row)
            print(json.dumps(row))
    results["seconds"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [
        "| pair | low layers | avg bits | LIM | LIM reversed | ZD (paper) | ZD reversed | random (median of 3) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['high']}/{r['low']} | {r['k_low']} ({r['fraction']:.0%}) | {r['avg_bits']:.3f} | {r['lim']:.2f} | "
            f"{r['lim-rev']:.2f} | {r['zd']:.2f} | {r['zd-rev']:.2f} | {r['random_median']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
