"""Export a checkpoint, load the export without layerwise's modules, and compare.

    python benchmarks/export_check.py CKPT [--format compressed-tensors|gguf] [--out PATH] [--json FILE]
                                           [--gguf-embeddings q8_0|f16|f32]

Steps, each timed:
  1. ``layerwise export CKPT --format FORMAT`` (into `--out`, default CKPT + "-ct" or CKPT + ".gguf");
  2. compressed-tensors: the bits per decoder weight the export takes on disk: every ``weight_packed``,
     ``weight_scale`` and ``weight_zero_point`` of the decoder layers (``weight_shape`` excluded: two int64
     per module), over the number of decoder linear weights of the original model. gguf: the file's size;
  3. the export loaded into a transformers model (float32): compressed-tensors through its own
     ``ModelCompressor`` (the path asymmetric exports need, since transformers 5 cannot load packed zero
     points, docs/export.md), gguf through transformers' GGUF loader (``from_pretrained(gguf_file=...)``,
     which dequantizes with the `gguf` package);
  4. perplexity of that model and of ``layerwise.load(CKPT)`` under the same protocol as ``layerwise eval``
     (``wiki-16k-w1024``), and the largest logit difference on one sentence; for gguf, when
     llama-cpp-python is installed, also the perplexity llama.cpp computes on the same token windows.

The targets (issue 15): both perplexities equal (gguf: where the grid is layerwise's), and a 3.25-bit plan
at most 3.3 bits per decoder weight on disk in compressed-tensors.
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


def llama_cpp_perplexity(path: Path, windows: torch.Tensor) -> float | None:
    """Perplexity of a GGUF file in llama.cpp (llama-cpp-python) on these token windows; None without it."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(str(path), n_ctx=windows.shape[1], logits_all=True, verbose=False, n_threads=2)
    nll, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logprobs = torch.log_softmax(torch.tensor(llm.scores[: len(window) - 1], dtype=torch.float64), dim=-1)
        targets = torch.tensor(window[1:])
        nll -= float(logprobs[torch.arange(len(targets)), targets].sum())
        count += len(targets)
    return round(float(torch.exp(torch.tensor(nll / count))), 3)


def protocol_windows(tokenizer) -> torch.Tensor:
    from layerwise.data.corpora import load_text, token_windows
    from layerwise.eval.perplexity import DEFAULT_PROTOCOL

    text = load_text(DEFAULT_PROTOCOL.corpus, DEFAULT_PROTOCOL.split)
    return token_windows(tokenizer, text, DEFAULT_PROTOCOL.n_windows, DEFAULT_PROTOCOL.window_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--format", choices=["compressed-tensors", "gguf"], default="compressed-tensors")
    parser.add_argument("--gguf-embeddings", default="q8_0")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    gguf = args.format == "gguf"
    out = args.out or args.checkpoint.with_name(args.checkpoint.name + (".gguf" if gguf else "-ct"))
    row: dict = {"checkpoint": str(args.checkpoint), "format": args.format, "export": str(out)}

    start = time.perf_counter()
    export_checkpoint(args.checkpoint, out, args.format, overwrite=True, gguf_embeddings=args.gguf_embeddings)
    row["export_seconds"] = round(time.perf_counter() - start, 1)

    ckpt = layerwise.load(args.checkpoint)
    report = ckpt.meta.get("report", {})
    row["checkpoint_avg_bits"] = report.get("avg_bits")
    if gguf:
        row["gguf_embeddings"] = args.gguf_embeddings
        row["export_file_mb"] = round(out.stat().st_size / 1e6, 1)
    else:
        stored = safetensors.torch.load_file(out / "model.safetensors")
        decoder_bytes = sum(t.numel() * t.element_size() for k, t in stored.items()
                            if ".layers." in k and ".weight_" in k and not k.endswith("weight_shape"))
        weights = report.get("decoder_weights")
        row["export_decoder_bits_per_weight"] = round(decoder_bytes * 8 / weights, 4) if weights else None
        row["export_file_mb"] = round((out / "model.safetensors").stat().st_size / 1e6, 1)

    start = time.perf_counter()
    if gguf:
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    else:
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
    if gguf:
        row["llama_cpp_perplexity"] = llama_cpp_perplexity(out, protocol_windows(ckpt.tokenizer))
    text = json.dumps(row, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
