"""GPTQ (Frantar et al., 2022): quantize one column at a time and push its error onto the columns left.

Math. For one output row w and inputs with Hessian ``H = (2/n) X^T X``, the loss of replacing w by q is
``(w - q) H (w - q)^T / 2``. Quantizing column j and re-optimising the not-yet-quantized columns F gives
the update ``delta_F = -(w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{F,j}``. With U the upper Cholesky factor of
``H^-1`` (``U^T U = H^-1``), row j of U is exactly ``[H_F^-1]_{j,F} / sqrt([H_F^-1]_jj)`` for the
successive F, so the whole sequence of updates is ``e_j = (w_j - q_j) / U_jj`` and
``W[:, k] -= e_j * U_jk`` for k > j: one factorisation, no re-inversion. Updates are applied lazily in
blocks: inside a block each column updates the block's later columns at once, and the rest of the matrix
gets the whole block's errors as one matmul, ``W[:, rest] -= E_block @ U[block, rest]``.

Codes, scales and zeros follow RTN's conventions (`layerwise.quant.grid`), and the result is packed
exactly like RTN, so everything downstream of `QuantizedWeight` is method-agnostic. A group's scale and
zero come from the spec's grid; the ``mse`` grid weighs each input column's error by ``diag(H)``, the
part of the loss above that one weight's error alone accounts for.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from layerwise.core.bitstream import PackFormat, pack, pack_zeros, row_chunks
from layerwise.core.errors import LayerwiseError
from layerwise.core.gguf_types import GGUF_TYPES
from layerwise.core.types import QuantSpec
from layerwise.quant.gguf_grid import gguf_grid, nearest_codes, pack_blocks
from layerwise.quant.grid import grid_params, grouped_params
from layerwise.quant.hessian import AsymmetricHessian, SharedInputHessians
from layerwise.quant.quantized import QuantizedWeight, all_finite, check_weight
from layerwise.quant.registry import QUANTIZERS, Quantizer

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
    if not all_finite(hessian):
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


def _upper_inverse_factor(hessian: torch.Tensor, damping: torch.Tensor | float) -> torch.Tensor | None:
    """Upper U with ``U^T U = (H + damping I)^-1``, or None when that is not numerically positive definite.

    Each (K, K) intermediate is freed as soon as the next exists, so at most three are alive with H (for
    a llama down_proj, K = 11008, each is 0.45 GiB).
    """
    damped = hessian.clone()
    damped.diagonal().add_(damping)
    with _fixed_threads(hessian.device):
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) != 0 or not all_finite(lower):
            return None
        inverse = torch.cholesky_inverse(lower)
        del lower
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    if int(info) != 0 or not all_finite(upper):
        return None
    return upper


@contextmanager
def _fixed_threads(device: torch.device) -> Iterator[None]:
    """One thread for LAPACK's factorisations on the CPU, whatever the process runs on.

    A CPU Cholesky factor changes in its last bits with the thread count (MKL's, by up to 1.4e-3 on a
    576-wide Hessian: `benchmarks/thread_invariance.py`) while the matmuls GPTQ also runs do not, and
    GPTQ's error feedback turns those bits into other codes. On one thread, one process with several
    threads and several single-threaded ranks quantize alike. The price is the factorisations' own
    parallelism on the CPU; a GPU's are left as they are.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _permuted(matrix: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``matrix[perm][:, perm]`` as float32, gathered a few rows at a time (no full-size temporaries)."""
    out = torch.empty(matrix.shape, dtype=torch.float32, device=matrix.device)
    for rows in row_chunks(matrix.shape[0], matrix.shape[1]):
        out[rows] = matrix.index_select(0, perm[rows]).index_select(1, perm)
    return out


def _stacked(weights: list[torch.Tensor], perm: torch.Tensor) -> torch.Tensor:
    """``torch.cat(weights)[:, perm]``, each weight's columns gathered straight into its rows of the result."""
    out = torch.empty(sum(w.shape[0] for w in weights), perm.numel(), dtype=weights[0].dtype, device=perm.device)
    start = 0
    for w in weights:
        torch.index_select(w, 1, perm, out=out[start : start + w.shape[0]])
        start += w.shape[0]
    return out


@dataclass
class _RowSet:
    """Several weights that share one Hessian, stacked row-wise so one column sweep quantizes them all.

    GPTQ treats every output row independently given H (the error feedback only moves weights within a
    row), so rows of different weights -- q, k and v, or one weight at several bit widths -- can share a
    sweep; per-row bit widths and symmetry come along as columns of `maxq` and row slices.
    """

    weights: list[torch.Tensor]
    specs: list[QuantSpec]

    @property
    def slices(self) -> list[slice]:
        bounds = [0]
        for w in self.weights:
            bounds.append(bounds[-1] + w.shape[0])
        return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]

    def maxq(self, device: torch.device) -> torch.Tensor:
        """The largest code of every stacked row, as a float (rows,) vector."""
        pairs = zip(self.weights, self.specs, strict=True)
        return torch.cat([torch.full((w.shape[0],), float(2**s.bits - 1)) for w, s in pairs]).to(device)

    def group_params(self, columns: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row scale and zero of the stacked rows' `columns` (one group), each with its own spec;
        `importance` is diag(H) of those columns."""
        params = [grid_params(columns[rows], s.bits, s.sym, s.grid, importance)
                  for rows, s in zip(self.slices, self.specs, strict=True)]
        return torch.cat([p[0] for p in params]), torch.cat([p[1] for p in params])


@dataclass
class _StaticColumns:
    """Static groups, fixed before the sweep: every stacked row's scale and zero for any processed columns.

    Act-order's integer grids (`affine` False: ``(q - zero) * scale``), or GGUF types' grids (`affine` True:
    ``scale * c + offset`` with the offset in place of the zero, c in each row's [`low`, `high`], which is how
    their dequantizers compute). Kept per group ((rows, n_groups) per weight, groups `widths` columns wide)
    and expanded one block of columns at a time: expanded for all columns at once they would take two
    float32 copies of the stacked weights.
    """

    params: list[tuple[torch.Tensor, torch.Tensor]]
    widths: list[int]
    perm: torch.Tensor
    affine: bool = False
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None

    def block(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, stop - start) scales and zeros (offsets) of processed columns start..stop."""
        cols = self.perm[start:stop]
        pairs = list(zip(self.params, self.widths, strict=True))
        return (torch.cat([p[0][:, cols // width] for p, width in pairs]),
                torch.cat([p[1][:, cols // width] for p, width in pairs]))


def _quantize_columns(
    weight: torch.Tensor,
    upper: torch.Tensor,
    rows: _RowSet,
    block_size: int,
    column_params: _StaticColumns | None,
    group_size: int = 0,
    importance: torch.Tensor | None = None,
    asymmetry: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Codes (int32, in `weight`'s processing order) and the dynamic groups' scales and zeros; None on blow-up.

    `weight` (modified in place) and `upper` are already in processing order. `column_params` gives
    the processed columns' static scales and zeros per row (act-order), or is None to compute each
    group's from the current weights at its first column (natural order, one `group_size` for all rows,
    `importance` = diag(H) in that order for the grid); the returned scales and zeros are only meaningful then.
    `asymmetry` (GPTAQ's P, strictly upper, in processing order) adds ``w_j * P[j, k]`` to every later
    column k once column j is quantized, w_j being column j as it was just before rounding; None leaves
    GPTQ's sweep exactly as it is.
    """
    n_rows, in_features = weight.shape
    device = weight.device
    maxq = rows.maxq(device)
    n_groups = -(-in_features // group_size) if column_params is None else 0
    scales = torch.zeros(n_rows, n_groups, dtype=torch.float32, device=device)
    zeros = torch.zeros_like(scales)
    diagonal = upper.diagonal().tolist()
    # Codes are integers below 2**8, exact in float32 and int32 alike: stored straight as int32.
    codes = torch.empty(n_rows, in_features, dtype=torch.int32, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        block = weight[:, start:stop].clone()
        errors = torch.zeros_like(block)
        u_block = upper[start:stop, start:stop]
        block_scales, block_zeros = column_params.block(start, stop) if column_params is not None else (None, None)
        for i in range(stop - start):
            col = start + i
            if block_scales is not None and block_zeros is not None:
                scale, zero = block_scales[:, i], block_zeros[:, i]
            else:
                group = col // group_size
                if col % group_size == 0:
                    end = min(col + group_size, in_features)
                    current = block[:, i : end - start]
                    if end > stop:  # the group runs past the block: add the updates still pending for it
                        beyond = weight[:, stop:end] - errors[:, :i] @ upper[start:col, stop:end]
                        if asymmetry is not None:
                            beyond += block[:, :i] @ asymmetry[start:col, stop:end]
                        current = torch.cat([current, beyond], dim=1)
                    assert importance is not None
                    scales[:, group], zeros[:, group] = rows.group_params(current, importance[col:end])
                scale, zero = scales[:, group], zeros[:, group]
            w = block[:, i]
            if column_params is not None and column_params.affine:  # a GGUF grid: zero is the offset
                q = nearest_codes(w, scale, zero, column_params.low, column_params.high)
                codes[:, col] = q
                error = w.sub(scale * q + zero).div_(diagonal[col])
            else:
                q = torch.minimum(torch.round(w / scale).add_(zero).clamp_(min=0), maxq)  # quantize_codes, per row
                codes[:, col] = q
                error = w.sub((q - zero).mul_(scale)).div_(diagonal[col])
            block[:, i + 1 :].addr_(error, u_block[i, i + 1 :], alpha=-1)
            if asymmetry is not None:  # column i of `block` is never written again: it stays w_i before rounding
                block[:, i + 1 :].addr_(w, asymmetry[start + i, start + i + 1 : stop])
            errors[:, i] = error
        weight[:, stop:] -= errors @ upper[start:stop, stop:]
        if asymmetry is not None:
            weight[:, stop:] += block @ asymmetry[start:stop, stop:]
        finite &= torch.isfinite(errors).all()
    if not bool(finite):
        return None
    return codes, scales, zeros


@dataclass
class HessianFactor:
    """What GPTQ derives from one Hessian, reusable by every weight quantized against it.

    `upper` is the upper Cholesky factor of the damped ``H^-1`` in processing order `perm`; `dead` marks
    inputs that never fired. Factoring once and sharing it is what makes q/k/v (or several candidate bit
    widths of one layer) cheap: the O(K^3) work is done once per distinct input.
    """

    hessian: torch.Tensor  # dead inputs fixed, permuted, not damped
    perm: torch.Tensor
    dead: torch.Tensor
    act_order: bool
    requested_damp: float
    damp: float = 0.0
    upper: torch.Tensor | None = None

    @classmethod
    def of(cls, hessian: torch.Tensor, *, damp: float = 0.01, act_order: bool = True) -> HessianFactor:
        """Factor `hessian` with damping `damp` (raised with a warning if H will not factor)."""
        source = hessian.detach()
        diagonal = source.diagonal().to(torch.float32, copy=True)
        dead = diagonal == 0
        diagonal[dead] = 1.0
        if act_order:
            perm = torch.argsort(diagonal, descending=True, stable=True)
        else:
            perm = torch.arange(source.shape[0], device=source.device)
        h = _permuted(source, perm)  # one float32 copy, however big H is
        h.diagonal()[dead[perm]] = 1.0
        factor = cls(h, perm, dead, act_order, damp)
        factor._factor(_damping_schedule(damp))
        return factor

    def _factor(self, schedule: list[float]) -> None:
        mean_diag = self.hessian.diagonal().mean()
        for used in schedule:
            self.upper = None  # free the last try's factor before making the next
            self.upper = _upper_inverse_factor(self.hessian, used * mean_diag)
            if self.upper is not None:
                self.damp = used
                return
        raise LayerwiseError(
            f"GPTQ could not invert the Hessian even with damping {schedule[-1]:g} x mean(diag(H)); it is not "
            "positive semi-definite, so it was not collected as (2/n) X^T X -- recollect it"
        )

    def redamp(self) -> None:
        """Refactor with the next damping of the schedule, after the error feedback blew up."""
        later = [d for d in _damping_schedule(self.requested_damp) if d > self.damp]
        if not later:
            raise LayerwiseError(
                f"GPTQ's error feedback diverged even with damping {self.damp:g} x mean(diag(H)); the Hessian is "
                "too ill-conditioned -- collect it over more calibration tokens"
            )
        self._factor(later)

    def warn_if_redamped(self) -> None:
        if self.damp != self.requested_damp:
            warnings.warn(
                f"GPTQ: the Hessian is singular or ill-conditioned (inverting it failed with damping "
                f"{self.requested_damp:g}); quantized with damping {self.damp:g} x mean(diag(H)) instead. Usual "
                f"causes: fewer calibration tokens than the {self.hessian.shape[0]} inputs, or duplicated inputs",
                RuntimeWarning,
                stacklevel=3,
            )


def quantize_gptq_shared(
    weights: list[torch.Tensor],
    specs: list[QuantSpec],
    hessian: torch.Tensor | HessianFactor | None,
    *,
    damp: float = 0.01,
    block_size: int = 32,
    act_order: bool = True,
) -> list[QuantizedWeight]:
    """GPTQ-quantize several weights that read the same input, in one column sweep.

    Each weight gets exactly what `quantize_gptq` would give it alone (up to float rounding); the specs
    may differ in bits, group size and symmetry (group sizes must agree without act-order, where groups
    are formed during the sweep). `hessian` may be a `HessianFactor` already computed for this input
    (its damping and act-order then apply).
    """
    if not weights or len(weights) != len(specs):
        raise LayerwiseError(f"need one spec per weight, got {len(weights)} weights and {len(specs)} specs")
    for weight in weights:
        _check_inputs(weight, hessian.hessian if isinstance(hessian, HessianFactor) else hessian, damp, block_size)
    if isinstance(hessian, HessianFactor):
        factor = hessian
    else:
        assert hessian is not None
        factor = HessianFactor.of(hessian, damp=damp, act_order=act_order)
    return sweep_factored(weights, specs, factor, block_size)


def sweep_factored(
    weights: list[torch.Tensor],
    specs: list[QuantSpec],
    factor: HessianFactor,
    block_size: int,
    asymmetry: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[QuantizedWeight]:
    """The column sweep of weights sharing one factored Hessian (inputs already checked), packed.

    `asymmetry` maps the factor's current `upper` to the matrix `_quantize_columns` adds for GPTAQ; it is
    called again after each re-damping, since that changes `upper`. Without it this is GPTQ.
    """
    rows = _RowSet([w.detach().to(device=factor.hessian.device, dtype=torch.float32) for w in weights], specs)
    for w in rows.weights:
        w[:, factor.dead] = 0.0
    if any(s.gguf is not None for s in specs):
        return _sweep_gguf(weights, specs, rows, factor, block_size, asymmetry)
    group_sizes = sorted({s.group_size for s in specs})
    column_params = None
    importance = factor.hessian.diagonal()  # in processing order, dead inputs at 1 (their weights are 0)
    if factor.act_order:  # static groups: each weight's natural groups, at its own group size
        natural = torch.empty_like(importance)
        natural[factor.perm] = importance
        params = [grouped_params(w, spec, natural) for w, spec in zip(rows.weights, specs, strict=True)]
        column_params = _StaticColumns(params, [s.group_size for s in specs], factor.perm)
    elif len(group_sizes) > 1:
        raise LayerwiseError(
            f"without act-order, weights quantized in one GPTQ sweep must share a group size, got {group_sizes}"
        )
    while True:
        assert factor.upper is not None
        extra = None if asymmetry is None else asymmetry(factor.upper)
        # The working copy (in processing order) is gathered afresh for every try: no second copy kept.
        result = _quantize_columns(_stacked(rows.weights, factor.perm), factor.upper, rows, block_size,
                                   column_params, group_sizes[0], importance, extra)
        del extra
        if result is not None:
            break
        factor.redamp()
    factor.warn_if_redamped()
    processed_codes, dynamic_scales, dynamic_zeros = result
    del result
    if not factor.act_order:
        params = [(dynamic_scales[part], dynamic_zeros[part]) for part in rows.slices]
    return [
        QuantizedWeight(
            qweight=pack(_unpermuted(processed_codes[part], factor.perm), spec.bits),
            scales=scale.to(torch.float16),
            zeros=None if spec.sym else pack_zeros(zero, spec.bits),
            spec=spec,
            out_features=weight.shape[0],
            in_features=weight.shape[1],
        )
        for weight, spec, part, (scale, zero) in zip(weights, specs, rows.slices, params, strict=True)
    ]


def _sweep_gguf(
    weights: list[torch.Tensor],
    specs: list[QuantSpec],
    rows: _RowSet,
    factor: HessianFactor,
    block_size: int,
    asymmetry: Callable[[torch.Tensor], torch.Tensor] | None,
) -> list[QuantizedWeight]:
    """The sweep for GGUF types: each weight's grid computed up front on its natural blocks (`gguf_grid`),
    codes chosen against it column by column with GPTQ's error feedback, written as the type's blocks."""
    if any(s.gguf is None for s in specs):
        raise LayerwiseError("GGUF types and integer options cannot share one GPTQ sweep; quantize them apart")
    kinds = [GGUF_TYPES[s.gguf] for s in specs]  # type: ignore[index]
    grids = [gguf_grid(w, kind) for w, kind in zip(rows.weights, kinds, strict=True)]
    device = factor.hessian.device
    low = torch.cat([torch.full((w.shape[0],), float(k.cmin)) for w, k in zip(rows.weights, kinds, strict=True)])
    high = torch.cat([torch.full((w.shape[0],), float(k.cmax)) for w, k in zip(rows.weights, kinds, strict=True)])
    column_params = _StaticColumns([(g.scale, g.offset) for g in grids], [k.sub_block for k in kinds], factor.perm,
                                   affine=True, low=low.to(device), high=high.to(device))
    while True:
        assert factor.upper is not None
        extra = None if asymmetry is None else asymmetry(factor.upper)
        result = _quantize_columns(_stacked(rows.weights, factor.perm), factor.upper, rows, block_size,
                                   column_params, asymmetry=extra)
        del extra
        if result is not None:
            break
        factor.redamp()
    factor.warn_if_redamped()
    codes = result[0]
    return [
        QuantizedWeight(qweight=pack_blocks(grid, _unpermuted(codes[part], factor.perm)), scales=None, zeros=None,
                        spec=spec, out_features=weight.shape[0], in_features=weight.shape[1])
        for weight, spec, part, grid in zip(weights, specs, rows.slices, grids, strict=True)
    ]


def quantize_gptq(
    weight: torch.Tensor,
    spec: QuantSpec,
    hessian: torch.Tensor | HessianFactor | None = None,
    *,
    damp: float = 0.01,
    block_size: int = 32,
    act_order: bool = True,
) -> QuantizedWeight:
    """GPTQ-quantize a (out_features, in_features) weight given its inputs' Hessian ``(2/n) X^T X``.

    `damp` is the fraction of ``mean(diag(H))`` added to H's diagonal before inverting: it stands in for
    the directions calibration never excited. If H is still not numerically positive definite, the
    damping is raised 10x (up to 3 times) with a warning naming the value used. Inputs that were always
    zero (``H[i, i] == 0``) get ``H[i, i] = 1`` and a zero weight column. `block_size` only trades speed
    for memory traffic; it does not change the result beyond float rounding.
    """
    return quantize_gptq_shared([weight], [spec], hessian, damp=damp, block_size=block_size, act_order=act_order)[0]


def _unpermuted(codes: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Codes in processing order back in the original column order (one weight's rows at a time)."""
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out



@QUANTIZERS.register("gptq")
class GptqQuantizer(Quantizer):
    """GPTQ with the default damping, block size and act-order (`quantize_gptq`, `quantize_gptq_shared`).

    Needs the inputs' Hessian (the driver collects it); weights reading the same input (q/k/v, gate/up,
    or several candidate options of one module) are quantized in one column sweep. Stores the same
    bitstream format as RTN.
    """

    name: ClassVar[str] = "gptq"
    needs_hessian: ClassVar[bool] = True
    storage: ClassVar[str] = PackFormat.BITSTREAM.value
    shares_hessian: ClassVar[bool] = True

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        return quantize_gptq(weight, spec, hessian)

    def quantize_shared(
        self, weights: list[torch.Tensor], specs: list[QuantSpec], hessian: torch.Tensor | None
    ) -> list[QuantizedWeight]:
        return quantize_gptq_shared(weights, specs, hessian)


def checked_hessians(layer: int, collector: SharedInputHessians) -> dict[str, torch.Tensor | AsymmetricHessian]:
    """The collected Hessians (summed over the ranks of a process group), warning for each module that saw
    fewer tokens than it has inputs (on all ranks together)."""
    hessians = collector.hessians()
    for name, (n_tokens, in_features) in collector.token_counts().items():
        needed = min_calibration_tokens(in_features)
        if n_tokens < needed:
            warnings.warn(
                f"layer {layer} {name}: {n_tokens} calibration tokens for {in_features} inputs; "
                f"the Hessian is rank-deficient below {needed} (it is dampened); give more --calib-windows",
                stacklevel=3,
            )
    return hessians
