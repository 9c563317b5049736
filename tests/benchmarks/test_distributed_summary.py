"""benchmarks/distributed.py's per-phase summary of interleaved pairs (the runs themselves take minutes)."""

from __future__ import annotations

from benchmark_scripts import load_benchmark


def _pair(one: dict[str, float], ranks: dict[str, float]) -> dict:
    return {"one_process": {"phase_seconds": one}, "ranks": {"phase_seconds": ranks}}


def test_phase_summary_takes_medians_and_counts_pairs_where_ranks_are_no_slower():
    pairs = [_pair({"load": 1.0, "score": 10.0}, {"load": 1.2, "score": 8.0}),
             _pair({"load": 0.9, "score": 12.0}, {"load": 0.9, "score": 9.0}),
             _pair({"load": 1.4, "score": 11.0}, {"load": 1.1, "score": 13.0})]
    summary = load_benchmark("distributed").phase_summary(pairs)
    assert summary["load"] == {"one_process_median": 1.0, "ranks_median": 1.1, "ranks_no_slower": 2, "pairs": 3}
    assert summary["score"] == {"one_process_median": 11.0, "ranks_median": 9.0, "ranks_no_slower": 2, "pairs": 3}


def test_phase_summary_of_the_unpooled_runs_compares_them_with_the_one_process():
    pairs = [{**_pair({"score": 10.0}, {"score": 10.0}), "unpooled": {"phase_seconds": {"score": 11.0}}},
             {**_pair({"score": 12.0}, {"score": 12.5}), "unpooled": {"phase_seconds": {"score": 11.5}}}]
    summary = load_benchmark("distributed").phase_summary(pairs, "unpooled")
    assert summary["score"] == {"one_process_median": 11.0, "ranks_median": 11.25, "ranks_no_slower": 1, "pairs": 2}
