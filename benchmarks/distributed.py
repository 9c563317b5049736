"""One process against N torch.distributed (gloo) processes on this machine: time per phase and the result.

    python benchmarks/distributed.py [--ranks 2] [--out benchmarks/results/distributed] [-- COMPRESS FLAGS...]

Runs ``layerwise compress`` on the default model twice with the same flags: once as one process with
``--ranks`` threads, once under torchrun as ``--ranks`` processes of one thread each, so both use the same
cores. Records each run's wall time and phase times (the checkpoint's ``report.metrics.phase_seconds``),
whether the two plans are identical, and how far the dequantized weights are apart (largest relative
Frobenius difference over the decoder's linear modules; 0 when byte-identical). On a machine with as many
cores as processes the speedup is bounded by the cores, not by the method: the point is the overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import layerwise
from layerwise.model.adapter import decoder_layers, linear_modules

DEFAULT_FLAGS = ["--bits", "3.25", "--calib-windows", "32", "--method", "gptq", "--rotate", "none"]


def run(argv: list[str], ranks: int, threads: int, out: Path) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks > 1 else \
        [sys.executable]
    command = [*launcher, "-m", "layerwise", "compress", *argv, "--out", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    wall = time.perf_counter() - start
    meta = json.loads((out / "layerwise.json").read_text())
    metrics = meta["report"]["metrics"]
    return {"ranks": ranks, "threads_per_rank": threads, "command": " ".join(command[1:]),
            "wall_seconds": round(wall, 1), "phase_seconds": metrics["phase_seconds"],
            "avg_bits": meta["report"]["avg_bits"]}


def weights(path: Path) -> dict[str, torch.Tensor]:
    model = layerwise.load(path).model
    return {f"{i}.{name}": module.dequantize() for i, layer in enumerate(decoder_layers(model))
            for name, module in linear_modules(layer).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed"))
    parser.add_argument("flags", nargs="*", help="compress flags (default: %(default)s)", default=DEFAULT_FLAGS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    one = run(args.flags, 1, args.ranks, args.out / "one-ckpt")
    many = run(args.flags, args.ranks, 1, args.out / "ranks-ckpt")
    plans = [json.loads((args.out / n / "layerwise.json").read_text())["plan"]["layers"]
             for n in ("one-ckpt", "ranks-ckpt")]
    a, b = weights(args.out / "one-ckpt"), weights(args.out / "ranks-ckpt")
    record = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        "runs": [one, many],
        "plans_identical": plans[0] == plans[1],
        "byte_identical_weights": all(torch.equal(a[k], b[k]) for k in a),
        "max_relative_weight_difference": max(float(torch.linalg.norm(a[k] - b[k]) / torch.linalg.norm(a[k]))
                                              for k in a),
    }
    print(json.dumps(record, indent=1))
    (args.out / f"ranks-{args.ranks}.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
