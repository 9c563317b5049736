"""Does the thread count a process scored on change how fast it then quantizes on 2 threads? One process, no
torch.distributed: the question behind 2 ranks' RTN on pooled threads (benchmarks/distributed.py).

    python benchmarks/thread_history.py [--pairs 4] [--out DIR] [-- COMPRESS FLAGS...]

Runs ``layerwise compress`` on the default model (default flags: the seed paper's path, LIM, lwq, RTN) as one
process of 2 threads, with its score phase on 1 thread or on 2, in turn ``--pairs`` times, and records how
long `apply_plan` (the quantize phase's work, on 2 threads in both) took, with the minor page faults and the
process's system CPU time during it. Under torchrun, each rank scores on its one thread, and rank 0 then
quantizes on both ranks' threads (`layerwise.core.dist.pooled_threads`); this measures that history without
the group. ``--malloc-fixed`` runs every process with glibc's mmap threshold fixed and its trim threshold and
top pad raised (measured: under 500 page faults in the quantize phase in 11 of 14 runs, against thousands
without), to tell the faults apart from the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DEFAULT_FLAGS = ["--bits", "3.25", "--scorer", "lim", "--method", "rtn", "--calib-windows", "32", "--rotate", "none"]
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
                "MALLOC_TOP_PAD_": str(256 << 20)}


def measuring(apply_plan: Callable[..., Any], record: Callable[[dict[str, float]], Any]) -> Callable[..., Any]:
    """`apply_plan` that, when it ends, gives `record` its seconds and the minor page faults and system CPU
    seconds of this process during it."""
    def applied(*args, **kwargs):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        try:
            return apply_plan(*args, **kwargs)
        finally:
            after = resource.getrusage(resource.RUSAGE_SELF)
            record({"seconds": round(time.perf_counter() - start, 3),
                    "minor_faults": after.ru_minflt - before.ru_minflt,
                    "system_seconds": round(after.ru_stime - before.ru_stime, 3)})

    return applied


def worker(score_threads: int, argv: list[str]) -> int:
    """One run: the score phase on `score_threads`, everything else on the process's 2; prints the quantize
    work's seconds, page faults and system time as the last line of stdout."""
    import layerwise.engine.pipeline as pipeline
    from layerwise.cli import main as cli

    score, apply_plan = pipeline._score, pipeline.apply_plan
    measured: dict[str, float] = {}

    def scored(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(score_threads)
        try:
            return score(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    pipeline._score, pipeline.apply_plan = scored, measuring(apply_plan, measured.update)
    code = cli(argv)
    print(json.dumps(measured))
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed"))
    parser.add_argument("--malloc-fixed", action="store_true", help="glibc's thresholds fixed (see above)")
    parser.add_argument("flags", nargs="*", default=DEFAULT_FLAGS, help="compress flags (default: %(default)s)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(FIXED_MALLOC if args.malloc_fixed else {})}
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.pairs):
        for score_threads in (1, 2):
            command = [sys.executable, __file__, "--worker", str(score_threads), "compress", *args.flags,
                       "--out", str(args.out / "history-ckpt"), "--overwrite"]
            done = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True)
            runs[score_threads].append(json.loads(done.stdout.strip().splitlines()[-1]))
    record = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "flags": args.flags,
              "malloc_fixed": args.malloc_fixed,
              "quantize_work_median_seconds": {f"scored on {t} thread(s)": statistics.median(r["seconds"] for r in rs)
                                               for t, rs in runs.items()},
              "pairs_slower_after_1_thread": sum(a["seconds"] > b["seconds"]
                                                 for a, b in zip(runs[1], runs[2], strict=True)),
              "runs": {f"scored on {t} thread(s)": rs for t, rs in runs.items()}}
    print(json.dumps(record, indent=1))
    name = "thread-history-malloc-fixed.json" if args.malloc_fixed else "thread-history.json"
    (args.out / name).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # a run started by `main`: --worker SCORE_THREADS COMMAND...
        sys.exit(worker(int(sys.argv[2]), sys.argv[3:]))
    main()
