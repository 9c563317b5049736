"""The repository's top-level `kernels/` folder must not pass for the hub package `kernels`.

Python started in the repository root has the folder on sys.path as a top-level `kernels`; transformers
probes for the hub package of that name while loading a model (and imports it as a last resort).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import layerwise.kernels

REPO_ROOT = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils.import_utils import _is_package_available, is_kernels_available

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[1])
    AutoModelForCausalLM.from_pretrained(sys.argv[1])  # runs transformers' optional-package probes
    found = {"available": is_kernels_available(), "package": list(_is_package_available("kernels", True))}
    try:
        from kernels import get_kernel  # noqa: F401
        found["get_kernel"] = True
    except ImportError:
        found["get_kernel"] = False
    module = sys.modules.get("kernels")
    found["file"] = getattr(module, "__file__", None)
    found["layerwise_imported"] = sorted(n for n in sys.modules if n.startswith("layerwise"))
    import layerwise.kernels  # the real package still works in the same process
    found["real"] = layerwise.kernels.__name__ + ":" + str(callable(layerwise.kernels.dequantize))
    print(json.dumps(found))
    """
)


def test_repo_root_kernels_folder_is_not_taken_for_the_hub_package(tmp_path):
    # `python -c` puts the working directory first on sys.path, exactly like an interactive session there.
    # PYTHONPATH too: the other way the repository root lands on sys.path.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "tiny")], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["available"] is False
    assert found["package"] == [False, "N/A"]
    assert found["get_kernel"] is False
    assert found["file"] is None  # nothing importable from the repository folder under the hub name
    assert found["layerwise_imported"] == []  # the probe did not import layerwise as a side effect
    assert found["real"] == "layerwise.kernels:True"


def test_installed_package_is_unaffected():
    assert layerwise.kernels.__file__.endswith("__init__.py")
    assert callable(layerwise.kernels.dequantize) and "dequant_matmul" in layerwise.kernels.__all__
