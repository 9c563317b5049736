"""GPTQ and GPTAQ's update rules taken literally, for the quantizers' tests to compare against.

Float64, unblocked, re-inverting the remaining columns' Hessian at every step: slow, and plain enough to
read against the papers.
"""

from __future__ import annotations

import torch

from layerwise.core.types import QuantSpec
from layerwise.quant import group_params, quantize_codes


def naive_gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, act_order: bool, damp: float = 0.01,
               cross: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """The codes GPTQ gives (GPTAQ's with `cross` C and its weight `alpha`).

    After quantizing column j (w_j its value just before rounding) the remaining columns F (j first) move by
    ``-(w_j - q_j) / [H_F^-1]_jj [H_F^-1]_{j,F}``; GPTAQ adds ``alpha w_j C[j, F'] H_F'^-1`` over the columns
    F' after j. Inputs with a zero Hessian diagonal are dead: their weights are zeroed, as GPTQ does.
    """
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    k = w.shape[1]
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    g = spec.group_size
    n_groups = spec.n_groups(k)
    scales = torch.zeros(w.shape[0], n_groups)
    zeros = torch.zeros_like(scales)
    if act_order:
        order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist()
        for grp in range(n_groups):
            scales[:, grp], zeros[:, grp] = group_params(w[:, grp * g : (grp + 1) * g], spec.bits, spec.sym)
    else:
        order = list(range(k))
    codes = torch.zeros(w.shape, dtype=torch.int32)
    for step, j in enumerate(order):
        if not act_order and j % g == 0:
            scales[:, j // g], zeros[:, j // g] = group_params(w[:, j : j + g], spec.bits, spec.sym)
        scale, zero = scales[:, j // g], zeros[:, j // g]
        q = quantize_codes(w[:, j], scale, zero, spec.bits)
        codes[:, j] = q
        before = w[:, j].clone()
        rest, later = order[step:], order[step + 1 :]
        h_inv = torch.linalg.inv(h[rest][:, rest])
        error = (w[:, j] - ((q - zero) * scale).to(torch.float64)) / h_inv[0, 0]
        w[:, rest] -= error[:, None] * h_inv[0][None, :]
        if cross is not None and later:
            move = cross.to(torch.float64)[j, later] @ torch.linalg.inv(h[later][:, later])
            w[:, later] += alpha * before[:, None] * move[None, :]
    return codes
