"""Peak RSS per phase of the default compress of the default model (RSS sampled every 0.1 s).

Run: python benchmarks/compress_memory.py [REFERENCE_CHECKPOINT]. Prints the peak RSS (MiB) while loading,
in the Fisher pass, in the rest of scoring and while quantizing, the process's ru_maxrss, and, given a
checkpoint written by `layerwise compress --bits 3.25` (the defaults), whether this run chose its plan.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import layerwise
import layerwise.api as api
import layerwise.importance.sensitivity as sensitivity
from layerwise.model.loading import load_model


class PhaseMemory:
    """Peak RSS per named phase; wrapped functions name the phase they run in."""

    def __init__(self) -> None:
        self.phase = "load"
        self.peaks: dict[str, float] = {}
        self.running = True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while self.running:
            phase = self.phase
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), rss_mib())
            time.sleep(0.1)

    def wrap(self, module: object, name: str, label: str) -> None:
        original: Callable = getattr(module, name)

        def run(*args, **kwargs):
            outer, self.phase = self.phase, label
            try:
                return original(*args, **kwargs)
            finally:
                self.phase = f"{outer}, after {label}"

        setattr(module, name, run)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    memory = PhaseMemory()
    memory.wrap(sensitivity, "output_fisher", "fisher")
    memory.wrap(api, "score_model", "scoring")
    memory.wrap(api, "_quantize", "quantize")
    model, tokenizer = load_model(None)
    memory.phase = "loaded"
    start = time.perf_counter()
    result = layerwise.compress(model, tokenizer=tokenizer, bits=3.25, progress=False)
    memory.running = False
    print(json.dumps({k: round(v) for k, v in memory.peaks.items()}, indent=1))
    print(f"compress seconds {time.perf_counter() - start:.0f}")
    print(f"ru_maxrss MiB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    if len(sys.argv) > 1:
        reference = json.loads((Path(sys.argv[1]) / "layerwise.json").read_text())["plan"]["layers"]
        mine = result.plan.to_dict()["layers"]
        print("plan identical to the reference checkpoint's:", mine == reference)


if __name__ == "__main__":
    main()
