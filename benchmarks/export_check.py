"""Export a checkpoint to compressed-tensors, load the export without layerwise's modules, and compare.

    python benchmarks/export_check.py CKPT [--out DIR] [--json FILE]

Steps, each timed:
  1. ``layerwise export CKPT --format compressed-tensors`` (into `--out`, default CKPT + "-ct");
  2. the bits per decoder weight the export takes on disk: every ``weight_packed``, ``weight_scale`` and
     ``weight_zero_point`` of the decoder layers (``weight_shape`` excluded: two int64 per module), over the
     number of decoder linear weights of the original model;
  3. the export loaded by compressed-tensors' own ``ModelCompressor`` into a transformers model (float32):
     the path asymmetric exports need, since transformers 5 cannot load packed zero points
     (docs/export.md); symmetric exports also load with ``from_pretrained``;
  4. perplexity of that model and of ``layerwise.load(CKPT)`` under the same protocol as ``layerwise eval``
     (``wiki-16k-w1024``), and the largest logit difference on the first evaluation window.

The target (issue 15) is that both perplexities are equal and that a 3.25-bit plan takes at most 3.3 bits per
decoder weight on disk.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import safetensors.torch
import torch

import layerwise
from layerwise.eval import perplexity
from layerwise.output.export import export_checkpoint


def load_with_compressed_tensors(directory: Path) -> torch.nn.Module:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    qconfig = QuantizationConfig.model_validate(config.quantization_config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    compressor = ModelCompressor(quantization_config=qconfig)
    apply_quantization_config(model, qconfig)
    compressor.compress_model(model)
    result = model.load_state_dict(safetensors.torch.load_file(directory / "model.safetensors"), strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise SystemExit(f"the export does not match its config: {result}")
    compressor.decompress_model(model)
    if tied:
        model.tie_weights()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or args.checkpoint.with_name(args.checkpoint.name + "-ct")
    row: dict = {"checkpoint": str(args.checkpoint), "export": str(out)}

    start = time.perf_counter()
    export_checkpoint(args.checkpoint, out, "compressed-tensors", overwrite=True)
    row["export_seconds"] = round(time.perf_counter() - start, 1)

    ckpt = layerwise.load(args.checkpoint)
    stored = safetensors.torch.load_file(out / "model.safetensors")
    decoder_bytes = sum(t.numel() * t.element_size() for k, t in stored.items()
                        if ".layers." in k and ".weight_" in k and not k.endswith("weight_shape"))
    report = ckpt.meta.get("report", {})
    weights = report.get("decoder_weights")
    row["checkpoint_avg_bits"] = report.get("avg_bits")
    row["export_decoder_bits_per_weight"] = round(decoder_bytes * 8 / weights, 4) if weights else None
    row["export_file_mb"] = round((out / "model.safetensors").stat().st_size / 1e6, 1)

    start = time.perf_counter()
    exported = load_with_compressed_tensors(out)
    row["load_seconds"] = round(time.perf_counter() - start, 1)
    ids = ckpt.tokenizer("The history of the printing press began in", return_tensors="pt").input_ids
    with torch.inference_mode():
        ours, theirs = ckpt.model(input_ids=ids).logits, exported(input_ids=ids).logits
    row["max_logit_difference"] = float((ours - theirs).abs().max())
    for name, model in (("checkpoint", ckpt.model), ("export", exported)):
        result = perplexity(model, ckpt.tokenizer, progress=False)
        row[f"{name}_perplexity"] = round(result.perplexity, 3)
        row["protocol"] = result.protocol
    text = json.dumps(row, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
