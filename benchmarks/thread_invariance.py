"""Which of GPTQ's CPU operations give the same bits with 1 thread and with 2: the question behind comparing one
process of 2 threads with 2 ranks of 1 thread (benchmarks/distributed.py).

    python benchmarks/thread_invariance.py

On the default model's shapes (576-wide inputs, 1536-wide down_proj inputs, 512-token windows) it runs a linear
layer's forward, the Gram matrix ``X^T X`` of its inputs, and the Cholesky factorisation GPTQ starts from, once
with each thread count, and prints for each whether the results are equal bit for bit and their largest
difference.
"""

from __future__ import annotations

import json
import os

import torch


def operations(x: torch.Tensor, weight: torch.Tensor, wide: torch.Tensor) -> dict[str, torch.Tensor]:
    gram = x.T @ x
    return {
        "linear forward (512 x 576 by 1536 x 576)": torch.nn.functional.linear(x, weight),
        "X^T X (576 inputs)": gram,
        "X^T X (1536 inputs)": wide.T @ wide,
        "Cholesky of X^T X + I (576)": torch.linalg.cholesky(gram + torch.eye(gram.shape[0])),
    }


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 576, generator=generator) * torch.rand(576, generator=generator) * 10
    weight = torch.randn(1536, 576, generator=generator)
    wide = torch.randn(512, 1536, generator=generator)
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results[threads] = operations(x, weight, wide)
    report = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "operations": {
        name: {"bit_identical": bool(torch.equal(one, results[2][name])),
               "max_abs_difference": float((one - results[2][name]).abs().max())}
        for name, one in results[1].items()}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
