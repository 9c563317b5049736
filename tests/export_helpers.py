"""Loading an export in a fresh interpreter that never imports layerwise, and comparing its logits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import layerwise

TOLERANCE = 1e-3  # max |logit difference| / max |logit|


def layerwise_logits(path: Path, ids: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        return layerwise.load(path).model(input_ids=torch.tensor(ids)).logits


def logits_in_subprocess(tmp_path: Path, body: str, ids: list[list[int]]) -> torch.Tensor:
    """Run `body` (which sets `model`) in a fresh interpreter without layerwise; return its logits."""
    script = "import sys, torch\n" + textwrap.dedent(body) + textwrap.dedent(f"""
        assert "layerwise" not in sys.modules
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({ids})).logits
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
    """)
    # Not from the repository root: its kernels/ folder would shadow the `kernels` package transformers probes.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt")


def decompressor_body(directory: Path) -> str:
    """Load a compressed-tensors export through compressed-tensors' own ModelCompressor (float32)."""
    return f"""
        import json, safetensors.torch
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
        from transformers import AutoConfig, AutoModelForCausalLM
        directory = {str(directory)!r}
        config = AutoConfig.from_pretrained(directory)
        qconfig = QuantizationConfig.model_validate(config.quantization_config)
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        compressor = ModelCompressor(quantization_config=qconfig)
        apply_quantization_config(model, qconfig)
        compressor.compress_model(model)  # the compressed layout: packed weights and zero points
        state = safetensors.torch.load_file(directory + "/model.safetensors")
        result = model.load_state_dict(state, strict=False)
        tied = getattr(model.config, "tie_word_embeddings", False)
        missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
        assert not missing and not result.unexpected_keys, result
        compressor.decompress_model(model)
        if tied:
            model.tie_weights()
    """


def relative_difference(got, expected):
    difference = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"max |logit difference| / max |logit| = {difference:.3g}")  # shown with pytest -s
    return difference
