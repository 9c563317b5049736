"""Streaming compression of a model larger than half of this machine's memory: peak RSS against model size.

Writes a randomly initialised llama (7B-shaped layers by default) as bf16 safetensors, one shard per decoder
layer, building and saving one layer at a time (this script never holds the model either), then runs
``layerwise compress --stream`` on it in a child process and records that process's peak RSS (``ru_maxrss``
from ``wait4``) against the model's float32 size, the largest decoder layer's float32 size and the
calibration activations (one layer's inputs and outputs on the calibration windows, float32). The target
(issue 7) is peak RSS < (largest layer + activations) x 2 + 2 GiB.

    python benchmarks/streaming.py /tmp/lw-stream            # build the model (once) and compress it
    python benchmarks/streaming.py /tmp/lw-stream --gptq     # also GPTQ on a one-layer model of the same shapes
    python benchmarks/rss_trace.py -- compress ...           # where in the code the peak is (see that script)

Results go to DIR/results.json and are printed as a Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

GiB = 2**30


def llama_config(args: argparse.Namespace, n_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=n_layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def layer_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    h, i = args.hidden, args.intermediate
    return {
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (h, h), "self_attn.v_proj.weight": (h, h),
        "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }


def tokenizer():
    """A small byte-level BPE tokenizer trained on Python's docs (no hub); ids stay far below the vocab."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_model(path: Path, args: argparse.Namespace, n_layers: int) -> None:
    """Random llama as bf16 shards: one per decoder layer, one for embeddings, final norm and head."""
    if (path / "model.safetensors.index.json").is_file():
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    llama_config(args, n_layers).save_pretrained(tmp)
    tokenizer().save_pretrained(tmp)
    generator = torch.Generator().manual_seed(0)
    n_files = n_layers + 1
    weight_map: dict[str, str] = {}
    total = 0

    def random(shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    for k in range(n_files):
        if k < n_layers:
            tensors = {f"model.layers.{k}.{n}": random(s) for n, s in layer_shapes(args).items()}
        else:
            tensors = {"model.embed_tokens.weight": random((args.vocab, args.hidden)),
                       "model.norm.weight": random((args.hidden,)), "lm_head.weight": random((args.vocab, args.hidden))}
        name = f"model-{k + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
        print(f"  wrote {name}", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    os.replace(tmp, path)


def run_child(argv: list[str]) -> tuple[int, float, int]:
    """Run `argv`; its exit status, wall seconds and peak RSS in bytes (wait4's ru_maxrss, KiB on Linux)."""
    start = time.perf_counter()
    child = subprocess.Popen(argv)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024


def measure(model_dir: Path, out: Path, compress_args: list[str], args: argparse.Namespace, n_layers: int,
            label: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "layerwise.cli", "--quiet", "compress", str(model_dir), "--stream",
            "--calib", "pydoc", "--calib-windows", str(args.calib_windows), "--calib-len", str(args.calib_len),
            "--out", str(out), "--overwrite", *compress_args]
    print("$ " + " ".join(argv), flush=True)
    code, seconds, peak = run_child(argv)
    if code != 0:
        raise SystemExit(f"compress failed with exit status {code}")
    shapes = layer_shapes(args)
    layer_params = sum(torch.Size(s).numel() for s in shapes.values())
    other_params = 2 * args.vocab * args.hidden + args.hidden
    largest_layer = 4 * layer_params
    activations = 2 * args.calib_windows * args.calib_len * args.hidden * 4  # a layer's inputs + outputs, fp32
    target = 2 * (largest_layer + activations) + 2 * GiB
    ckpt_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {
        "label": label, "command": " ".join(argv), "layers": n_layers,
        "model_fp32_gib": round(4 * (n_layers * layer_params + other_params) / GiB, 2),
        "model_bf16_files_gib": round(2 * (n_layers * layer_params + other_params) / GiB, 2),
        "largest_layer_fp32_gib": round(largest_layer / GiB, 3),
        "activations_gib": round(activations / GiB, 3),
        "peak_rss_gib": round(peak / GiB, 2), "target_gib": round(target / GiB, 2), "meets_target": peak < target,
        "wall_s": round(seconds, 1), "checkpoint_gib": round(ckpt_bytes / GiB, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_mem_total() / GiB:.1f} GiB RAM",
        "torch_threads": torch.get_num_threads(),
    }


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="where the model, checkpoints and results.json go (~20 GB free)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--compress", default="--bits 3.25 --scorer lim --method rtn --group-size 128",
                        help="compress arguments for the whole model (default: LIM scores, lwq plan, RTN)")
    parser.add_argument("--gptq", action="store_true", help="also GPTQ on a one-layer model of the same shapes")
    parser.add_argument("--gptq-layers", type=int, default=1, help="layers of the GPTQ model (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    results = []
    model_dir = args.dir / f"llama-{args.layers}x{args.hidden}"
    print(f"building {model_dir}", flush=True)
    build_model(model_dir, args, args.layers)
    results.append(measure(model_dir, args.dir / "ckpt", args.compress.split(), args, args.layers, "whole model"))
    if args.gptq:
        n = args.gptq_layers
        small = args.dir / f"llama-{n}x{args.hidden}"
        build_model(small, args, n)
        results.append(measure(small, args.dir / "ckpt-gptq", ["--uniform", "4", "--method", "gptq", "--group-size",
                                                               "128"], args, n, f"{n} layer(s), GPTQ 4-bit"))
    if not args.keep:
        for out in ("ckpt", "ckpt-gptq"):
            shutil.rmtree(args.dir / out, ignore_errors=True)
    (args.dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| run | model fp32 | largest layer | activations | peak RSS | target | wall |")
    for r in results:
        print(f"| {r['label']} ({r['layers']} layers) | {r['model_fp32_gib']} GiB | "
              f"{r['largest_layer_fp32_gib']} GiB | {r['activations_gib']} GiB | {r['peak_rss_gib']} GiB | "
              f"{r['target_gib']} GiB | {r['wall_s']} s |")


if __name__ == "__main__":
    main()
