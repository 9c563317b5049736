"""benchmarks/distributed.py's per-phase summary of interleaved pairs (the runs themselves take minutes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed.py"


def _module():
    spec = importlib.util.spec_from_file_location("distributed_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pair(one: dict[str, float], ranks: dict[str, float]) -> dict:
    return {"one_process": {"phase_seconds": one}, "ranks": {"phase_seconds": ranks}}


def test_phase_summary_takes_medians_and_counts_pairs_where_ranks_are_no_slower():
    pairs = [_pair({"load": 1.0, "score": 10.0}, {"load": 1.2, "score": 8.0}),
             _pair({"load": 0.9, "score": 12.0}, {"load": 0.9, "score": 9.0}),
             _pair({"load": 1.4, "score": 11.0}, {"load": 1.1, "score": 13.0})]
    summary = _module().phase_summary(pairs)
    assert summary["load"] == {"one_process_median": 1.0, "ranks_median": 1.1, "ranks_no_slower": 2, "pairs": 3}
    assert summary["score"] == {"one_process_median": 11.0, "ranks_median": 9.0, "ranks_no_slower": 2, "pairs": 3}
