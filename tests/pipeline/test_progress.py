"""Every phase of a run is announced by name and timed on its own; per-layer progress also reaches a log."""

from __future__ import annotations

import io

from conftest import random_windows

import layerwise
from layerwise.core import progress


def test_phases_are_announced_and_timed_each_on_its_own(tiny_model_dir, capsys):
    result = layerwise.compress(str(tiny_model_dir), bits=3.25, scorer="lim", method="gptq", group_size=32,
                                calib=random_windows(4, 24))
    err = capsys.readouterr().err
    # The tiny llama's head is not tied, so the default rotation (auto) rotates it, as its own phase.
    for phase in ("load", "calibrate", "structure", "rotate (hadamard)", "score (lim)", "plan (lwq)",
                  "quantize (gptq)", "write"):
        assert f"layerwise: {phase}" in err
    seconds = result.report.metrics["phase_seconds"]
    # The report is written into the checkpoint, so the time of writing it is not in it.
    assert set(seconds) == {"load", "calibrate", "structure", "rotate", "score", "plan", "quantize"}
    assert result.report.metrics["quantize_seconds"] == seconds["quantize"]
    assert result.report.metrics["score_seconds"] == seconds["score"]
    assert result.report.metrics["compress_seconds"] >= seconds["score"] + seconds["quantize"]


def test_a_bar_prints_plain_lines_when_stderr_is_not_a_terminal(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)
    assert list(progress.bar(range(3), desc="quantizing", unit="layer")) == [0, 1, 2]
    lines = log.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"quantizing: {i}/3 layers" for i in (1, 2, 3)]
    assert "\r" not in log.getvalue()


def test_units_are_pluralised_as_english_nouns(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)
    for unit in ("batch", "window", "pass"):
        list(progress.bar(range(2), desc="d", unit=unit))
    assert [line.split(" (")[0] for line in log.getvalue().splitlines()[1::2]] == [
        "d: 2/2 batches", "d: 2/2 windows", "d: 2/2 passes"]


def test_quiet_runs_print_nothing(tiny_model_dir, capsys):
    layerwise.compress(str(tiny_model_dir), uniform=4, method="rtn", group_size=32, progress=False)
    assert capsys.readouterr().err == ""
