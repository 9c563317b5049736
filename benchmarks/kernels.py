"""Triton dequant-matmul kernels: time against cuBLAS fp16, bandwidth as a fraction of peak, decode tokens/s.

On a CUDA GPU:

* matmul: ``y = x @ W^T`` for (N, K) in 4096x4096, 11008x4096, 4096x11008, M in 1, 16, 128, each bit
  width 2/3/4/8 with group 128 (asymmetric, fp16 activations), against ``F.linear`` with the fp16
  weight (cuBLAS). Times are medians of CUDA-event timings of a CUDA graph of `--iters` calls (so
  launch overhead is not counted; eager launches if capture fails, said in the JSON), after warm-up.
  The weights rotate through enough copies to exceed the L2 cache, so every call reads them from HBM.
  GB/s counts the bytes a call must move: packed weights + scales + zeros + activations + output (for
  cuBLAS the fp16 weight instead). It is divided by the GPU's peak memory bandwidth, `--peak-gbps` or
  the datasheet value for H100 / H200 (see `PEAK_GBPS`).
* decode: greedy `model.generate` tokens/s of the default model (SmolLM2-135M-Instruct) at batch 1 in
  fp16, dense vs compressed uniform 4-bit g128 RTN through the kernel vs the same through the torch
  reference path (``LAYERWISE_KERNEL=torch``).

Without CUDA it is a smoke test of the same kernels under the Triton interpreter at tiny sizes: it checks
them against the torch reference and says that speed needs a GPU. Usage::

    python benchmarks/kernels.py            # writes benchmarks/results/kernels.json (CPU: kernels-interpreter.json)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: kernels are built for the interpreter when decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from layerwise.kernels import KERNEL_ENV, torch_ref, triton_available, triton_dequant_matmul  # noqa: E402
from layerwise.quant import pack  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (N, K): y = x @ W^T with W of N x K
BATCHES = (1, 16, 128)
BITS = (2, 3, 4, 8)
GROUP = 128
# Peak HBM bandwidth, GB/s, from NVIDIA's datasheets: H100 SXM5 3.35 TB/s, H100 PCIe 2.0 TB/s, H100 NVL
# 3.9 TB/s, H200 4.8 TB/s. Matched against torch.cuda.get_device_name in this order (the SXM part reports
# itself as "NVIDIA H100 80GB HBM3", so plain "H100" comes last).
PEAK_GBPS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0))
L2_FLUSH_BYTES = 256 * 2**20  # weights cycled per timing: several times the 50-60 MB L2 of an H100 / H200


def packed_weight(n: int, k: int, bits: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random asymmetric group-128 codes in the stored layout (the values do not affect the speed)."""
    gen = torch.Generator().manual_seed(seed)
    groups = math.ceil(k / GROUP)
    return dict(
        qweight=pack(torch.randint(0, 2**bits, (n, k), generator=gen), bits).to(device),
        scales=(0.001 + 0.01 * torch.rand(n, groups, generator=gen)).half().to(device),
        zeros=(torch.rand(n, groups, generator=gen) * (2**bits - 1)).half().to(device),
    )


def kernel_call(x: torch.Tensor, w: dict[str, torch.Tensor], bits: int, k: int) -> torch.Tensor:
    return triton_dequant_matmul(x, w["qweight"], w["scales"], w["zeros"], bits, GROUP, k, False)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def cuda_time_ms(calls: list[Callable[[], object]], iters: int, repeats: int) -> tuple[float, str]:
    """Median milliseconds per call, cycling through `calls`, from CUDA events around a graph replay."""
    for call in calls:  # warm-up: compiles the kernel, fills caches and allocators
        call()
    torch.cuda.synchronize()

    def loop() -> None:
        for i in range(iters):
            calls[i % len(calls)]()

    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loop()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            loop()
        run, mode = graph.replay, "cuda-graph"
    except RuntimeError:
        run, mode = loop, "eager"
    run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times), mode


def copies_of(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """`tensors` plus clones at other addresses, together larger than L2, so no call finds them cached."""
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    clones = [{name: t.clone() for name, t in tensors.items()} for _ in range(math.ceil(L2_FLUSH_BYTES / size) - 1)]
    return [tensors, *clones]


def matmul_rows(peak_gbps: float, iters: int, repeats: int) -> list[dict]:
    rows = []
    for n, k in SHAPES:
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.float16) for m in BATCHES}
        io_bytes = {m: (m * k + m * n) * 2 for m in BATCHES}
        dense = copies_of({"w": torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02})
        cublas_ms = {}
        for m, x in xs.items():
            ms, mode = cuda_time_ms([partial(F.linear, x, w["w"]) for w in dense], iters, repeats)
            cublas_ms[m] = ms
            gbps = (n * k * 2 + io_bytes[m]) / ms / 1e6
            rows.append(dict(n=n, k=k, m=m, kernel="cublas-fp16", bits=16, ms=ms, gbps=gbps,
                             peak_fraction=gbps / peak_gbps, timing=mode))
            print(f"N={n} K={k} M={m:3d} cuBLAS fp16: {ms * 1e3:8.1f} us {gbps:7.0f} GB/s "
                  f"({gbps / peak_gbps:.0%} of peak)", flush=True)
        del dense
        for bits in BITS:
            weights = copies_of(packed_weight(n, k, bits, "cuda"))
            w0 = weights[0]
            weight_bytes = sum(t.numel() * t.element_size() for t in w0.values())
            for m, x in xs.items():
                ref = torch_ref.dequant_matmul(x, w0["qweight"], w0["scales"], w0["zeros"], bits, GROUP, k, False)
                error = relative_error(kernel_call(x, w0, bits, k), ref)
                ms, mode = cuda_time_ms([partial(kernel_call, x, w, bits, k) for w in weights], iters, repeats)
                gbps = (weight_bytes + io_bytes[m]) / ms / 1e6
                rows.append(dict(n=n, k=k, m=m, kernel="triton", bits=bits, ms=ms, gbps=gbps,
                                 peak_fraction=gbps / peak_gbps, speedup_vs_cublas=cublas_ms[m] / ms,
                                 max_rel_error=error, timing=mode))
                print(f"N={n} K={k} M={m:3d} triton {bits}-bit: {ms * 1e3:8.1f} us {gbps:7.0f} GB/s "
                      f"({gbps / peak_gbps:.0%} of peak), x{cublas_ms[m] / ms:.2f} vs cuBLAS, error {error:.1e}",
                      flush=True)
            del weights, w0
    return rows


def decode_tokens_per_second(model, inputs: dict, new_tokens: int, repeats: int) -> float:
    """Median tokens/s of greedy decoding `new_tokens` tokens (prefill included), after one warm-up."""
    def run() -> None:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    run()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def decode_rows(new_tokens: int, repeats: int) -> dict:
    import layerwise
    from layerwise.model.loading import load_model

    base, tokenizer = load_model("smollm2-135m")
    inputs = tokenizer("The history of the printing press", return_tensors="pt").to("cuda")
    dense = copy.deepcopy(base).to("cuda", torch.float16)
    result: dict = {"model": "smollm2-135m", "new_tokens": new_tokens, "batch": 1, "dtype": "float16"}
    result["fp16_tokens_per_s"] = decode_tokens_per_second(dense, inputs, new_tokens, repeats)
    del dense
    layerwise.compress(base, uniform=4, group_size=GROUP, method="rtn", progress=False)
    quantized = base.to("cuda", torch.float16)
    previous = os.environ.get(KERNEL_ENV)
    try:
        for choice in ("triton", "torch"):
            os.environ[KERNEL_ENV] = choice
            tokens_per_s = decode_tokens_per_second(quantized, inputs, new_tokens, repeats)
            result[f"rtn4_g128_{choice}_tokens_per_s"] = tokens_per_s
    finally:
        if previous is None:
            os.environ.pop(KERNEL_ENV, None)
        else:
            os.environ[KERNEL_ENV] = previous
    print(json.dumps(result, indent=2), flush=True)
    return result


def peak_bandwidth(name: str, override: float | None) -> tuple[float, str]:
    if override:
        return override, "--peak-gbps"
    for key, gbps in PEAK_GBPS:
        if key in name:
            return gbps, f"datasheet ({key})"
    raise SystemExit(f"no known peak bandwidth for {name!r}: pass --peak-gbps")


def interpreter_smoke() -> dict:
    """The kernels under the Triton interpreter at tiny sizes: correctness only."""
    rows = []
    n, k = 48, 200  # not multiples of the tiles; 200 leaves a short last group of 72
    for bits in BITS:
        w = packed_weight(n, k, bits, "cpu")
        for m in (1, 17):  # the GEMV and the GEMM variant
            x = torch.randn(m, k, dtype=torch.float16)
            start = time.perf_counter()
            y = kernel_call(x, w, bits, k)
            seconds = time.perf_counter() - start
            ref = torch_ref.dequant_matmul(x, w["qweight"], w["scales"], w["zeros"], bits, GROUP, k, False)
            rows.append(dict(n=n, k=k, m=m, bits=bits, max_rel_error=relative_error(y, ref),
                             interpreter_seconds=round(seconds, 3)))
            print(f"interpreter N={n} K={k} M={m:2d} {bits}-bit: max relative error {rows[-1]['max_rel_error']:.1e}")
    worst = max(r["max_rel_error"] for r in rows)
    if worst > 2e-3:
        raise SystemExit(f"kernel disagrees with the torch reference: max relative error {worst:.1e}")
    print("correct under the Triton interpreter; speed needs a CUDA GPU (run this script there)")
    return {"mode": "interpreter", "device": "cpu", "matmul": rows,
            "note": "no CUDA: correctness smoke test only; timings need a GPU"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/results/kernels.json, or "
                        "kernels-interpreter.json for the CPU smoke test, so it never replaces GPU numbers)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="peak memory bandwidth in GB/s (default: datasheet value for H100 / H200)")
    parser.add_argument("--iters", type=int, default=100, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per configuration (median reported)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per decode run")
    parser.add_argument("--skip-decode", action="store_true", help="only the matmul benchmark")
    args = parser.parse_args()
    if not triton_available():
        raise SystemExit("triton is not installed: pip install 'layerwise[kernels]'")

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak, source = peak_bandwidth(name, args.peak_gbps)
        results = {"mode": "cuda", "device": name, "peak_gbps": peak, "peak_source": source,
                   "torch": torch.__version__, "group_size": GROUP,
                   "matmul": matmul_rows(peak, args.iters, args.repeats)}
        if not args.skip_decode:
            results["decode"] = decode_rows(args.new_tokens, args.repeats)
    else:
        results = interpreter_smoke()
    import triton

    results["triton"] = triton.__version__
    out = Path(args.out or f"benchmarks/results/kernels{'' if results['mode'] == 'cuda' else '-interpreter'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
