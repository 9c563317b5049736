"""llama.cpp's own Q3_K_M type choice against a measured allocation of the same size, same quantizer.

    python benchmarks/gguf_mix.py [--method gptaq] [--out benchmarks/results/gguf_mix]
                                  [--only rules,measured,measured-module]

Rows, each on the default model (SmolLM2-135M-Instruct, fp32, CPU), evaluated like ``layerwise eval``
(``wiki-16k-w1024``), each exported with ``layerwise export --format gguf`` (embedding q8_0, as llama.cpp
writes a tied head whose rows are not whole super-blocks) and, when llama-cpp-python is installed, evaluated
again inside llama.cpp on the same token windows:

  rules     the types llama.cpp's ``llama-quantize`` picks for ``Q3_K_M`` (``src/llama-quant.cpp``,
            `llama_cpp_q3_k_m`): q3_k by default, attn_v q5_k in the first two layers and q4_k after,
            attn_output q4_k, ffn_down q5_k in the first n/16 layers and q4_k after; then its fallback for
            rows that are not whole 256-weight super-blocks (q3_k -> q4_0, q4_k -> q5_0, q5_k -> q5_1), which
            on this model is every module but ffn_down. Quantized with `--method` (GPTAQ, layerwise's default)
            through ``layerwise.apply``.
  measured  ``layerwise.compress(bits=<rules' bits>, target="gguf", options=OPTIONS)``: measured damage per
            layer and option, the optimal planner, the same method: one type per layer.
  measured-module  the same with ``granularity="module"``: damage measured per linear module and option, one
            type per tensor, as llama.cpp's rules give.

The target (issue 15): the measured allocation's perplexity is lower than the rules' at the same size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from export_check import llama_cpp_perplexity, protocol_windows  # benchmarks/, beside this script

import layerwise
from layerwise.core.budget import average_bits
from layerwise.core.types import LayerAction, Plan, QuantSpec
from layerwise.eval import perplexity
from layerwise.model.adapter import decoder_layers, linear_modules, linear_shape
from layerwise.model.loading import load_model
from layerwise.output.export import export_checkpoint

OPTIONS = "q2_k,q3_k,q4_k,q5_k,q6_k,q4_1"


def llama_cpp_q3_k_m(n_layers: int, method: str) -> Plan:
    """llama.cpp's per-tensor types for ftype Q3_K_M on a llama model (before its row-size fallback, which
    `QuantSpec.fit` applies the same way)."""
    def spec(name: str) -> QuantSpec:
        return QuantSpec.of_gguf(name, method)

    layers = []
    for i in range(n_layers):
        overrides = {
            "self_attn.v_proj": spec("q5_k" if i < 2 else "q4_k"),
            "self_attn.o_proj": spec("q4_k"),
            "mlp.down_proj": spec("q5_k" if i < n_layers // 16 else "q4_k"),
        }
        layers.append(LayerAction(i, "quantize", 3, 256, method, gguf="q3_k", overrides=overrides))
    return Plan(layers, made_by={"planner": "llama.cpp Q3_K_M rules"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="gptaq")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf_mix"))
    parser.add_argument("--only", default="rules,measured,measured-module")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from layerwise.eval.perplexity import DEFAULT_PROTOCOL

    model, tokenizer = load_model(None)
    shapes = [{n: linear_shape(m) for n, m in linear_modules(layer).items()} for layer in decoder_layers(model)]
    rules = llama_cpp_q3_k_m(len(shapes), args.method)
    bits = round(average_bits(rules.layers, shapes), 4)
    windows = protocol_windows(tokenizer)
    for row in args.only.split(","):
        start = time.perf_counter()
        model, tokenizer = load_model(None)
        ckpt = args.out / f"{row}-ckpt"
        if row == "rules":
            result = layerwise.apply(model, rules, args.method, tokenizer=tokenizer, progress=True)
        else:
            granularity = "module" if row == "measured-module" else "layer"
            result = layerwise.compress(model, bits, target="gguf", options=OPTIONS, method=args.method,
                                        granularity=granularity, tokenizer=tokenizer, progress=True)
        seconds = time.perf_counter() - start
        layerwise.save(result, ckpt, overwrite=True)
        ppl = perplexity(result.model, tokenizer, progress=False).perplexity
        gguf_path = args.out / f"{row}.gguf"
        export_checkpoint(ckpt, gguf_path, "gguf", overwrite=True)
        record = {
            "row": row, "granularity": result.plan.made_by.get("granularity", "layer"), "method": args.method,
            "target_bits": bits, "avg_bits": round(result.report.avg_bits, 4),
            "perplexity": round(ppl, 3), "protocol": DEFAULT_PROTOCOL.name, "seconds": round(seconds, 1),
            "phase_seconds": result.report.metrics.get("phase_seconds"),
            "gguf_file_mb": round(gguf_path.stat().st_size / 1e6, 2),
            "types": {a.layer: (a.gguf, {n: s.gguf for n, s in a.overrides.items()}) for a in result.plan.layers},
            "group_fits": result.report.group_fits,
            "llama_cpp_perplexity": llama_cpp_perplexity(gguf_path, windows),
        }
        print(json.dumps(record, indent=1), flush=True)
        (args.out / f"{row}.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
