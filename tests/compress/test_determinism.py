"""Determinism: the same model, arguments and calibration give a byte-identical model.safetensors.

Within one process and across processes (different PYTHONHASHSEED, so set and dict-of-str iteration
orders differ), for RTN and GPTQ. Runs compare at the same torch thread count: CPU matmul reductions may
split differently with another count (see README, "Determinism").
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import random_windows, tiny_model

import layerwise

WINDOWS = random_windows(8, 32, seed=1)

CASES = {
    "lim-lwq-rtn": dict(bits=3.25, scorer="lim", method="rtn", group_size=32),
    "uniform-gptq": dict(uniform=3, method="gptq", group_size=32),
    "sensitivity-optimal-gptq": dict(bits=3.25, options="2:32,3:32,4:32"),
    "random-order-rtn": dict(bits=3.0, scorer="zd", order="random", seed=3, method="rtn", group_size=32),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_inputs_give_identical_bytes(tmp_path, arch, case):
    blobs = []
    for run in range(2):
        model = tiny_model(arch, n_layers=3)
        result = layerwise.compress(model, calib=WINDOWS, progress=False, **CASES[case])
        layerwise.save(result, str(tmp_path / str(run)))
        blobs.append((tmp_path / str(run) / "model.safetensors").read_bytes())
    assert blobs[0] == blobs[1]


def test_identical_bytes_across_processes(tiny_model_dir, tmp_path):
    """Two CLI runs with different hash seeds: GPTQ with the default scorer and planner (sensitivity, optimal)."""
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"ckpt-{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-m", "layerwise.cli", "--quiet", "compress", str(tiny_model_dir), "--bits", "3.25",
                "--options", "2:32,3:32,4:32", "--calib", "pydoc", "--calib-windows", "6",
                "--calib-len", "32", "--out", str(out)]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
