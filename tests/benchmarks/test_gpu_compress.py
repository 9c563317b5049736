"""benchmarks/gpu_compress.py at tiny shapes on the CPU: it runs end to end and writes what it promises.

The real run (Llama-3.1-8B shapes on a GPU) takes minutes; this only checks the script's plumbing.
"""

from __future__ import annotations

import json
import warnings

from benchmark_scripts import load_benchmark

TINY = ["--device", "cpu", "--layers", "2", "--hidden", "32", "--mlp", "64", "--heads", "2", "--kv-heads", "1",
        "--vocab", "64", "--windows", "2", "--len", "16", "--group-size", "32"]


def load_script():
    return load_benchmark("gpu_compress")


def test_tiny_run_writes_per_layer_results(tmp_path, monkeypatch, capsys):
    from layerwise.importance import SCORERS

    monkeypatch.setenv("OUT", str(tmp_path))
    script = load_script()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 32 calibration tokens: rank-deficient Hessians, on purpose
        script.main(TINY)
    data = json.loads((tmp_path / script.RESULT_FILE).read_text())
    assert data["config"]["placement"] == {"device": "cpu", "dtype": "bfloat16", "offload_activations": None}
    gptq, sensitivity = data["gptq"], data["sensitivity"]
    assert [e["layer"] for e in gptq["layers"]] == [0, 1] and gptq["extrapolated_seconds"] > 0
    assert all(e["seconds"] >= 0 and e["peak_gpu_bytes"] is None and e["host_peak_rss_bytes"] > 0
               for e in gptq["layers"])
    assert sensitivity["fisher"]["seconds"] >= 0 and len(sensitivity["score_layers"]) == 2
    assert len(sensitivity["apply_layers"]) == 2 and len(sensitivity["plan"]["layers"]) == 2
    assert sensitivity["extrapolated_score_seconds"] > 0 and sensitivity["extrapolated_apply_seconds"] > 0
    assert "| gptq | gptq | 0 |" in capsys.readouterr().out
    assert "bench-sensitivity" not in SCORERS  # the timed scorer is registered only while it runs
