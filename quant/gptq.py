"""GPTQ (Frantar et al., 2022): quantize one column at a time and push its error onto the columns left.

Math. For one output row w and inputs with Hessian ``H = (2/n) X^T X``, the loss of replacing w by q is
``(w - q) H (w - q)^T / 2``. Quantizing column j and re-optimising the not-yet-quantized columns F gives
the update ``delta_F = -(w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{F,j}``. With U the upper Cholesky factor of
``H^-1`` (``U^T U = H^-1``), row j of U is exactly ``[H_F^-1]_{j,F} / sqrt([H_F^-1]_jj)`` for the
successive F, so the whole sequence of updates is ``e_j = (w_j - q_j) / U_jj`` and
``W[:, k] -= e_j * U_jk`` for k > j: one factorisation, no re-inversion. Updates are applied lazily in
blocks: inside a block each column updates the block's later columns at once, and the rest of the matrix
gets the whole block's errors as one matmul, ``W[:, rest] -= E_block @ U[block, rest]``.

Codes, scales and zeros follow RTN's conventions (`group_params` and `quantize_codes` are reused), and
the result is packed exactly like RTN, so everything downstream of `QuantizedWeight` is method-agnostic.

Act-order with static groups. Processing columns by decreasing ``diag(H)`` quantizes the inputs that
matter most while the most columns are still free to absorb their error. Computing a group's scale when
its first column is reached would then tie groups to the processing order, so that the stored groups
would no longer be contiguous original columns; instead every group's scale and zero are computed up
front from the weight's natural column groups and each column uses its own group's, keeping RTN's
layout (contiguous groups, a shorter last group allowed) at the price of ranges that ignore the error
feedback. Without act-order, columns run in their natural order and a group's parameters come from the
error-updated weights when its first column is reached, as in the paper.

Precision: everything runs in float32 (see `layerwise.quant.hessian`); the relative diagonal damping,
not the arithmetic width, is what keeps ``H^-1`` well conditioned.
"""

from __future__ import annotations

import math
import warnings

import torch

from layerwise.errors import LayerwiseError
from layerwise.quant.packing import pack
from layerwise.quant.quantized import QuantizedWeight, check_weight
from layerwise.quant.registry import QUANTIZERS
from layerwise.quant.rtn import group_params, quantize_codes
from layerwise.types import QuantSpec

# After a failed factorisation the damping grows 10x per retry, from at least this fraction of
# mean(diag(H)) (so that damp=0 still has a fallback), this many times.
_MIN_RETRY_DAMP = 1e-3
_RETRIES = 3


def min_calibration_tokens(in_features: int) -> int:
    """Fewest calibration tokens for which a linear's H can be full rank.

    H is a mean of one rank-1 term per token, so with fewer tokens than inputs it is singular and GPTQ
    leans on damping alone for the missing directions. This is a floor for a warning, not a
    recommendation: the paper uses 128 sequences of 2048 tokens.
    """
    if in_features < 1:
        raise LayerwiseError(f"in_features must be positive, got {in_features}")
    return in_features


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor | None, damp: float, block_size: int) -> None:
    if hessian is None:
        raise LayerwiseError(
            "GPTQ needs calibration inputs: pass the linear's input Hessian (collect it with "
            "HessianAccumulator over calibration forwards), or use method 'rtn', which needs none"
        )
    check_weight(weight, "GPTQ")
    in_features = weight.shape[1]
    if tuple(hessian.shape) != (in_features, in_features):
        raise LayerwiseError(
            f"the Hessian has shape {tuple(hessian.shape)} but the weight has {in_features} inputs; "
            f"it must be ({in_features}, {in_features})"
        )
    if not torch.isfinite(hessian).all():
        raise LayerwiseError(
            "the Hessian contains NaN or inf values: the calibration activations overflowed; "
            "calibrate in float32 or with shorter / fewer outlier sequences"
        )
    if not (math.isfinite(damp) and damp >= 0):
        raise LayerwiseError(f"GPTQ damping must be a finite non-negative fraction, got {damp}")
    if block_size < 1:
        raise LayerwiseError(f"GPTQ block size must be positive, got {block_size}")


def _damping_schedule(damp: float) -> list[float]:
    first_retry = max(damp, _MIN_RETRY_DAMP)
    return [damp] + [first_retry * 10**i for i in range(1, _RETRIES + 1)]


def _upper_inverse_factor(hessian: torch.Tensor) -> torch.Tensor | None:
    """Upper U with ``U^T U = H^-1``, or None when H is not numerically positive definite."""
    lower, info = torch.linalg.cholesky_ex(hessian)
    if int(info) != 0 or not torch.isfinite(lower).all():
        return None
    inverse = torch.cholesky_inverse(lower)
    del lower
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0 or not torch.isfinite(upper).all():
        return None
    return upper


def _static_params(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_features, n_groups) scales and zeros of the natural contiguous column groups of `weight`."""
    params = [
        group_params(weight[:, start : start + spec.group_size], spec.bits, spec.sym)
        for start in range(0, weight.shape[1], spec.group_size)
    ]
    return torch.stack([p[0] for p in params], dim=1), torch.stack([p[1] for p in params], dim=1)


def _quantize_columns(
    weight: torch.Tensor,
    upper: torch.Tensor,
    group_of: list[int],
    spec: QuantSpec,
    params: tuple[torch.Tensor, torch.Tensor] | None,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Codes (in `weight`'s column order), scales and zeros; None if the error feedback blew up.

    `weight` (modified in place) and `upper` are already in processing order; ``group_of[j]`` is the
    group of processed column j. `params` holds static per-group scales and zeros, or is None to compute
    each group's from the current weights at its first column (natural order only).
    """
    out_features, in_features = weight.shape
    if params is None:
        n_groups = spec.n_groups(in_features)
        scales = torch.zeros(out_features, n_groups, dtype=torch.float32, device=weight.device)
        zeros = torch.zeros_like(scales)
    else:
        scales, zeros = params
    codes = torch.empty(out_features, in_features, dtype=torch.int32, device=weight.device)
    finite = torch.ones((), dtype=torch.bool, device=weight.device)
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        block = weight[:, start:stop].clone()
        errors = torch.zeros_like(block)
        u_block = upper[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            group = group_of[col]
            if params is None and col % spec.group_size == 0:
                end = min(col + spec.group_size, in_features)
                current = block[:, i : end - start]
                if end > stop:  # the group runs past the block: add the updates still pending for it
                    beyond = weight[:, stop:end] - errors[:, :i] @ upper[start:col, stop:end]
                    current = torch.cat([current, beyond], dim=1)
                scales[:, group], zeros[:, group] = group_params(current, spec.bits, spec.sym)
            scale, zero = scales[:, group], zeros[:, group]
            q = quantize_codes(block[:, i], scale, zero, spec.bits)
            codes[:, col] = q
            error = (block[:, i] - (q - zero) * scale) / u_block[i, i]
            block[:, i + 1 :] -= error[:, None] * u_block[i, i + 1 :][None, :]
            errors[:, i] = error
        weight[:, stop:] -= errors @ upper[start:stop, stop:]
        finite &= torch.isfinite(errors).all()
    if not bool(finite):
        return None
    return codes, scales, zeros


@QUANTIZERS.register("gptq")
def quantize_gptq(
    weight: torch.Tensor,
    spec: QuantSpec,
    hessian: torch.Tensor | None = None,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> QuantizedWeight:
    """GPTQ-quantize a (out_features, in_features) weight given its inputs' Hessian ``(2/n) X^T X``.

    `damp` is the fraction of ``mean(diag(H))`` added to H's diagonal before inverting: it stands in for
    the directions calibration never excited. If H is still not numerically positive definite, the
    damping is raised 10x (up to 3 times) with a warning naming the value used. Inputs that were always
    zero (``H[i, i] == 0``) get ``H[i, i] = 1`` and a zero weight column. `block_size` only trades speed
    for memory traffic; it does not change the result beyond float rounding.
    """
    _check_inputs(weight, hessian, damp, block_size)
    assert hessian is not None
    in_features = weight.shape[1]
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0

    if act_order:
        params = _static_params(w, spec)  # from the natural groups, before any permutation
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        params = None
        perm = torch.arange(in_features, device=w.device)
    group_of = (perm // spec.group_size).tolist()

    mean_diag = h.diagonal().mean()
    applied = 0.0
    result = None
    for used in _damping_schedule(damp):
        h.diagonal().add_((used - applied) * mean_diag)
        applied = used
        upper = _upper_inverse_factor(h)
        if upper is not None:
            result = _quantize_columns(w.clone(), upper, group_of, spec, params, block_size)
            del upper
        if result is not None:
            break
    if result is None:
        raise LayerwiseError(
            f"GPTQ could not invert the Hessian even with damping {applied:g} x mean(diag(H)); it is not "
            "positive semi-definite, so it was not collected as (2/n) X^T X -- recollect it"
        )
    if used != damp:
        warnings.warn(
            f"GPTQ: the Hessian is singular or ill-conditioned (inverting it failed with damping {damp:g}); "
            f"quantized with damping {used:g} x mean(diag(H)) instead. Usual causes: fewer calibration "
            f"tokens than the {in_features} inputs, or duplicated inputs",
            RuntimeWarning,
            stacklevel=2,
        )
    processed_codes, scales, zeros = result
    codes = torch.empty_like(processed_codes)
    codes[:, perm] = processed_codes  # back to the original column order
    return QuantizedWeight(
        qweight=pack(codes, spec.bits),
        scales=scales.to(torch.float16),
        zeros=None if spec.sym else zeros.to(torch.float16),
        spec=spec,
        out_features=weight.shape[0],
        in_features=in_features,
    )


quantize_gptq.needs_hessian = True  # read by the driver: collect calibration Hessians for this method
