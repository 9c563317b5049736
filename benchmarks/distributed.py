"""One process against N torch.distributed (gloo) processes on this machine: time per phase and the result.

    python benchmarks/distributed.py [--ranks 2] [--pairs K [--name SUFFIX]] [--out DIR] [-- COMPRESS FLAGS...]

Runs ``layerwise compress`` on the default model three times with the same flags: once as one process with
``--ranks`` threads, then twice under torchrun as ``--ranks`` processes of one thread each (so every run uses the
same cores), the sensitivity scorer's layer runs split among the ranks by windows, then by option runs (its
``split``, forced here; `layerwise.importance.sensitivity.choose_split` picks one otherwise). Records each run's
wall time and phase times (the checkpoint's ``report.metrics.phase_seconds``), and against the one-process run
whether the plans are identical and how far the dequantized weights are apart (largest relative Frobenius
difference over the decoder's linear modules; 0 when byte-identical). On a machine with as many cores as
processes the speedup is bounded by the cores, not by the method: the point is the overhead.

With ``--pairs K`` it runs one process and then ``--ranks`` ranks (split by windows), K times in turn, so that the
machine's drift, which moved a phase by up to 17% between runs here, falls on both sides alike; it records every
run's phases, each phase's median on both sides and in how many pairs the ranks were no slower, and whether the
last pair's plans and weights are identical. The ranks share this machine's cores, so they leave the work that
threads split well to rank 0 on all their threads (`layerwise.core.dist.pools_threads`); ``--unpooled`` adds a
third run to each turn whose ranks split that work too, as ranks on separate machines or GPUs do.

Every run also records how long `apply_plan` (the quantize phase's work, on rank 0 for ranks that share the
cores) took and the minor page faults and system CPU time of that process during it (``apply_plan`` in each
run's record; medians in ``apply_plan_medians``). ``--malloc-fixed`` runs every process with glibc's
thresholds fixed as ``benchmarks/thread_history.py --malloc-fixed`` does, and ``--one-arena`` with one glibc
arena for all of a process's threads, to tell the page faults from the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from thread_history import FIXED_MALLOC, measuring  # benchmarks/, beside this script

import layerwise
from layerwise.model.adapter import decoder_layers, linear_modules

DEFAULT_FLAGS = ["--bits", "3.25", "--calib-windows", "32", "--method", "gptq", "--rotate", "none"]


SPLITS = ("windows", "options")


def run(argv: list[str], ranks: int, threads: int, out: Path, split: str | None = None, pooled: bool = True,
        malloc: dict[str, str] | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", str(split), "pooled" if pooled else "unpooled"]
    if ranks > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    command += ["compress", *argv, "--out", str(out), "--overwrite"]
    applied = out.with_name(out.name + "-apply.json")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), APPLY_RECORD: str(applied), **(malloc or {})}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    wall = time.perf_counter() - start
    meta = json.loads((out / "layerwise.json").read_text())
    metrics = meta["report"]["metrics"]
    apply_record = json.loads(applied.read_text())
    applied.unlink()
    return {"ranks": ranks, "threads_per_rank": threads, "sensitivity_split": split, "pooled": pooled,
            "malloc": malloc or {}, "command": " ".join(command[1:]),
            "wall_seconds": round(wall, 1), "phase_seconds": metrics["phase_seconds"],
            "apply_plan": apply_record, "avg_bits": meta["report"]["avg_bits"]}


# Where a worker writes how long rank 0's (or the one process's) `apply_plan` took, with its faults.
APPLY_RECORD = "LAYERWISE_BENCH_APPLY_RECORD"


def worker(split: str, pooling: str, argv: list[str]) -> int:
    """One process of a run: the command line with the sensitivity scorer's split forced (unless ``None``), with
    ``unpooled`` every piece of work split among the ranks, none left to rank 0 on pooled threads, and
    `apply_plan` measured (written by rank 0, or the one process, to the file `APPLY_RECORD` names)."""
    import layerwise.engine.pipeline as pipeline
    import layerwise.importance.sensitivity as sensitivity
    from layerwise.cli import main as cli
    from layerwise.core import dist

    if split != "None":
        sensitivity.choose_split = lambda windows, runs, world: split
    if pooling == "unpooled":
        dist.pools_threads = lambda device: False
    def record(measured: dict[str, float]) -> None:
        if os.environ.get("RANK", "0") == "0":
            Path(os.environ[APPLY_RECORD]).write_text(json.dumps(measured))

    pipeline.apply_plan = measuring(pipeline.apply_plan, record)
    return cli(argv)


def weights(path: Path) -> dict[str, torch.Tensor]:
    model = layerwise.load(path).model
    return {f"{i}.{name}": module.dequantize() for i, layer in enumerate(decoder_layers(model))
            for name, module in linear_modules(layer).items()}


def plan_of(path: Path) -> list:
    return json.loads((path / "layerwise.json").read_text())["plan"]["layers"]


def interleaved(args: argparse.Namespace) -> None:
    pairs = []
    for _ in range(args.pairs):
        one = run(args.flags, 1, args.ranks, args.out / "one-ckpt", malloc=args.malloc)
        ranks = run(args.flags, args.ranks, 1, args.out / "ranks-ckpt", "windows", malloc=args.malloc)
        pairs.append({"one_process": one, "ranks": ranks})
        if args.unpooled:
            pairs[-1]["unpooled"] = run(args.flags, args.ranks, 1, args.out / "unpooled-ckpt", "windows", False,
                                        args.malloc)
    a, b = weights(args.out / "one-ckpt"), weights(args.out / "ranks-ckpt")
    record = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "flags": args.flags,
              "malloc": args.malloc, "phases": phase_summary(pairs),
              "apply_plan_medians": {side: {key: statistics.median(p[side]["apply_plan"][key] for p in pairs)
                                            for key in ("seconds", "minor_faults", "system_seconds")}
                                     for side in pairs[0]},
              "plan_identical": plan_of(args.out / "one-ckpt") == plan_of(args.out / "ranks-ckpt"),
              "byte_identical_weights": all(torch.equal(a[k], b[k]) for k in a), "pairs": pairs}
    if args.unpooled:
        c = weights(args.out / "unpooled-ckpt")
        record["unpooled_phases"] = phase_summary(pairs, "unpooled")
        record["unpooled_plan_identical"] = plan_of(args.out / "one-ckpt") == plan_of(args.out / "unpooled-ckpt")
        record["unpooled_byte_identical_weights"] = all(torch.equal(a[k], c[k]) for k in a)
    print(json.dumps(record, indent=1))
    (args.out / f"interleaved-{args.ranks}{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")


def phase_summary(pairs: list[dict], side: str = "ranks") -> dict[str, dict]:
    """Per phase: the median seconds of the one process and of the ranks' `side` of each turn, and in how many
    turns the ranks took no longer than the one process (phase times are rounded to 0.01 s, so a tie counts as
    no longer)."""
    summary = {}
    for phase in pairs[0]["one_process"]["phase_seconds"]:
        one = [p["one_process"]["phase_seconds"][phase] for p in pairs]
        ranks = [p[side]["phase_seconds"][phase] for p in pairs]
        summary[phase] = {"one_process_median": statistics.median(one), "ranks_median": statistics.median(ranks),
                          "ranks_no_slower": sum(r <= o for o, r in zip(one, ranks, strict=True)),
                          "pairs": len(pairs)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed"))
    parser.add_argument("flags", nargs="*", help="compress flags (default: %(default)s)", default=DEFAULT_FLAGS)
    parser.add_argument("--pairs", type=int, default=0,
                        help="instead: this many pairs of one process and --ranks ranks (split by windows), run in "
                             "turn so that the machine's drift falls on both; writes interleaved-RANKS[NAME].json")
    parser.add_argument("--name", default="", help="suffix of the --pairs record's file name, e.g. -early")
    parser.add_argument("--malloc-fixed", action="store_true", help="every process with glibc's thresholds fixed")
    parser.add_argument("--one-arena", action="store_true",
                        help="every process with one glibc arena for all its threads (MALLOC_ARENA_MAX=1)")
    parser.add_argument("--unpooled", action="store_true",
                        help="with --pairs: a third run each turn, the ranks splitting the work they share otherwise")
    args = parser.parse_args()
    args.malloc = {**(FIXED_MALLOC if args.malloc_fixed else {}),
                   **({"MALLOC_ARENA_MAX": "1"} if args.one_arena else {})}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pairs:
        interleaved(args)
        return
    runs = [run(args.flags, 1, args.ranks, args.out / "one-ckpt", malloc=args.malloc)]
    runs += [run(args.flags, args.ranks, 1, args.out / f"ranks-{split}-ckpt", split, malloc=args.malloc)
             for split in SPLITS]
    plan = plan_of(args.out / "one-ckpt")
    a = weights(args.out / "one-ckpt")
    for record, split in zip(runs[1:], SPLITS, strict=True):
        b = weights(args.out / f"ranks-{split}-ckpt")
        record["plan_identical_to_one_process"] = plan_of(args.out / f"ranks-{split}-ckpt") == plan
        record["byte_identical_weights"] = all(torch.equal(a[k], b[k]) for k in a)
        record["max_relative_weight_difference"] = max(float(torch.linalg.norm(a[k] - b[k]) / torch.linalg.norm(a[k]))
                                                       for k in a)
    record = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "runs": runs}
    print(json.dumps(record, indent=1))
    (args.out / f"ranks-{args.ranks}.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # a rank started by `run`: --worker SPLIT POOLING COMMAND...
        sys.exit(worker(sys.argv[2], sys.argv[3], sys.argv[4:]))
    main()
