"""Each group's quantization grid (scale and zero point), and how weights map to codes on it.

Conventions (shared by every method, since they only pick codes differently):

* Asymmetric, as in the GPTQ reference implementation: the group's range is widened to contain 0,
  ``xmin = min(min(w), 0)``, ``xmax = max(max(w), 0)``, ``scale = (xmax - xmin) / (2**b - 1)``,
  ``zero = round(-xmin / scale)``. Containing 0 makes an exact 0 weight dequantize to exactly 0 and keeps
  the integer zero point inside ``[0, 2**b - 1]``.
* Symmetric, the GPTQ / AutoGPTQ convention: ``scale = 2 * max|w| / (2**b - 1)`` and ``zero = 2**(b-1)``
  (not stored). All ``2**b`` codes are used, giving levels ``(-2**(b-1) .. 2**(b-1) - 1) * scale``; the
  largest positive weight ``(2**b - 1) / 2 * scale`` lands half a step beyond the top level, so it is
  clamped with an error of at most ``scale / 2`` -- no worse than ordinary rounding.
* Codes are ``clamp(round(w / scale) + zero, 0, 2**b - 1)``, rounding half to even (``torch.round``).
* Scales are stored as fp16, and they are rounded to fp16 *before* the codes are chosen. Otherwise the
  codes would be nearest for a scale that is never stored, and dequantizing with the stored scale would
  add a second, avoidable error.

Grids (``QuantSpec.grid``, names in `layerwise.core.types.GRIDS`):

* ``minmax`` (`group_params`): the group's whole range, as above.
* ``mse`` (`mse_group_params`): the scale (and zero) with the smallest weighted squared error
  ``sum_j d_j (w_j - q(w_j))**2`` of the group (`group_error`), where d is the diagonal of the inputs'
  Hessian when the method has one (the importance-matrix idea of llama.cpp's imatrix and llm-compressor's
  ``imatrix_mse`` observer: an input that is large on average costs more when its weight is off) and all
  ones otherwise. Clipping the range trades a larger error on the few extreme weights for a finer step
  for all the others. The search tries shrunk ranges, ``[a * xmin, b * xmax]`` with each end shrunk on its
  own (or ``p * max|w|`` when symmetric): a coarse sweep, then finer ones around each group's best; for
  an asymmetric grid, then the zero that is optimal for the best scale's codes, rounded. Last, weighted
  least-squares refits of the scale (and offset) to the best codes are tried. Every candidate is scored with
  its fp16 scale and integer zero, exactly as they will be stored and used, and the min/max grid is the
  first candidate, replaced only by a strictly smaller error: the result is never worse than ``minmax``
  on this objective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from layerwise.core.bitstream import row_chunks
from layerwise.core.errors import LayerwiseError
from layerwise.core.types import GRIDS, QuantSpec

# Range of positive fp16 values a scale is clamped to: the smallest subnormal and the largest finite.
_FP16_MIN_SCALE = 2.0**-24
_FP16_MAX = 65504.0

# The mse search. Symmetric: the fractions of max|w| of the coarse sweep (1.0, the min/max grid, is scored
# first anyway), then _FINE_STEPS steps of _FINE_STEP on each side of a group's best: 24 scorings. Asymmetric:
# every pair of _WINDOW_SHRINKS for the two ends, then the 8 neighbours of the best pair at each of
# _WINDOW_STEPS: 35 + 16 + 1. Then _REFITS least-squares refits (2 scorings each when asymmetric).
_SHRINKS = tuple(round(1.0 - 0.05 * i, 2) for i in range(1, 17))  # 0.95 .. 0.20
_WINDOW_SHRINKS = (1.0, 0.85, 0.7, 0.55, 0.4, 0.25)
_FINE_STEP = 0.01
_FINE_STEPS = 4
_WINDOW_STEPS = (0.05, 0.02)
_REFITS = 2

# (weights of groups along the last dimension, bits, sym, per-weight importance or None) -> (scale, zero)
GridSearch = Callable[[torch.Tensor, int, bool, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def storable_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round float32 scales to the fp16 value that will be stored, never 0 or inf.

    An all-zero group has scale 0; any positive scale reproduces it exactly, so 1 is used. A group so
    small that its scale underflows fp16 gets the smallest subnormal instead of a division by zero.
    """
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp(_FP16_MIN_SCALE, _FP16_MAX).to(torch.float16).to(torch.float32)


def group_params(w_group: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero point of the group(s) spanned by the last dimension of `w_group`.

    Returns two float32 tensors of shape ``w_group.shape[:-1]`` (no keepdim: a GPTQ caller applies them
    to one column at a time). The scale is already rounded to fp16; the zero is an integer value, fixed at
    ``2**(bits-1)`` when `sym`.
    """
    w = w_group.to(torch.float32)
    maxq = 2**bits - 1
    if sym:
        scale = storable_scale(w.abs().amax(dim=-1) * 2 / maxq)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    scale = storable_scale((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes ``clamp(round(w / scale) + zero, 0, 2**bits - 1)`` as int32.

    `scale` and `zero` must broadcast against `w` (add a trailing dimension for a whole group).
    """
    return _codes(w.to(torch.float32), scale, zero, 2**bits - 1).to(torch.int32)


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.div(w, scale).round_().add_(zero).clamp_(0, maxq)


def group_error(
    w_group: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_j d_j (w_j - q(w_j))**2`` over the last dimension: the objective the ``mse`` grid minimises.

    `scale` and `zero` have the groups' shape (``w_group.shape[:-1]``); `weights` (d, all ones when None)
    broadcasts against `w_group`. q uses the nearest codes, as RTN stores them.
    """
    w = w_group.to(torch.float32)
    return _error(w, _importance(w, weights), scale, zero, 2**bits - 1)


def _importance(w: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | None:
    """d as float32 broadcastable to `w`, or None for all ones (the multiplications are then skipped)."""
    return None if weights is None else weights.to(device=w.device, dtype=torch.float32)


def _weighted(x: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    """``x * d`` in place (x is a temporary), or x itself when d is all ones."""
    return x if d is None else x.mul_(d)


def _sum(x: torch.Tensor, d: torch.Tensor | None, keepdim: bool = False) -> torch.Tensor:
    """``sum_j d_j x_j`` over the last dimension."""
    if d is None:
        return x.sum(dim=-1, keepdim=keepdim)
    return (x * d).sum(dim=-1, keepdim=keepdim)


def _error(w: torch.Tensor, d: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    # In place on one temporary: the search scores the whole weight tens of times, so this is its cost.
    s, z = scale[..., None], zero[..., None]
    residual = _codes(w, s, z, maxq).sub_(z).mul_(s).sub_(w)
    return _weighted(residual.square_(), d).sum(dim=-1)


class _Best:
    """The best (scale, zero) per group so far; a candidate replaces it only where its error is smaller."""

    def __init__(self, w: torch.Tensor, d: torch.Tensor | None, maxq: int, scale: torch.Tensor, zero: torch.Tensor):
        self.w, self.d, self.maxq = w, d, maxq
        self.scale, self.zero = scale, zero
        self.error = _error(w, d, scale, zero, maxq)

    def offer(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Take the candidate where it is strictly better (NaN never is); the groups where it was."""
        error = _error(self.w, self.d, scale, zero, self.maxq)
        better = error < self.error
        self.scale = torch.where(better, scale, self.scale)
        self.zero = torch.where(better, zero, self.zero)
        self.error = torch.where(better, error, self.error)
        return better


def _optimal_zero(
    w: torch.Tensor, d: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """The zero that minimises the weighted error of the codes (scale, zero) gives, rounded into range.

    With codes c fixed, ``sum d (w - (c - z) s)**2`` is a parabola in z with its minimum at the weighted
    mean of ``c - w / s``. Where every d is 0 the zero is left as it was.
    """
    s = scale[..., None]
    shift = _codes(w, s, zero[..., None], maxq).sub_(torch.div(w, s))
    total = torch.full_like(scale, w.shape[-1]) if d is None else d.expand_as(w).sum(dim=-1)
    best = _weighted(shift, d).sum(dim=-1) / total
    return torch.where(total > 0, torch.round(best).clamp(0, maxq), zero)


def _refit(
    w: torch.Tensor, d: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor, maxq: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares scale (and offset, as a rounded zero) for the codes (scale, zero) gives.

    Symmetric: ``s = sum d w c' / sum d c'**2`` with ``c' = c - zero``. Asymmetric: the weighted linear fit
    ``w ~ s c + m``, then ``zero = round(-m / s)``. A degenerate fit (no spread, a non-positive or
    non-finite slope) keeps the scale it came from.
    """
    codes = _codes(w, scale[..., None], zero[..., None], maxq)
    if sym:
        centred = codes.sub_(zero[..., None])
        slope = _sum(w * centred, d) / _sum(centred.square(), d)
        new_zero = zero
    else:
        total = torch.full_like(w[..., :1], w.shape[-1]) if d is None else d.expand_as(w).sum(dim=-1, keepdim=True)
        mean_c = _sum(codes, d, keepdim=True) / total
        mean_w = _sum(w, d, keepdim=True) / total
        centred = codes.sub_(mean_c)
        slope = _sum(centred * (w - mean_w), d) / _sum(centred.square(), d)
        offset = mean_w[..., 0] - slope * mean_c[..., 0]
    usable = torch.isfinite(slope) & (slope > 0)
    new_scale = torch.where(usable, storable_scale(torch.where(usable, slope, scale)), scale)
    if not sym:
        new_zero = torch.where(usable, torch.round(-offset / new_scale).clamp(0, maxq), zero)
    return new_scale, new_zero


def mse_group_params(
    w_group: torch.Tensor, bits: int, sym: bool, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each group (last dimension of `w_group`) with the least `group_error`.

    `weights` (d) broadcasts against `w_group`: e.g. a (group_size,) Hessian diagonal shared by every row,
    or None for the plain squared error. Shapes, dtypes and conventions as `group_params`, whose result is
    returned for every group no candidate strictly improves.
    """
    w = w_group.to(torch.float32)
    d = _importance(w, weights)
    maxq = 2**bits - 1
    best = _Best(w, d, maxq, *group_params(w, bits, sym))
    if sym:
        _search_symmetric(best, w)
    else:
        _search_asymmetric(best, w)
    for _ in range(_REFITS):
        scale, zero = _refit(w, d, best.scale, best.zero, maxq, sym)
        best.offer(scale, zero)
        if not sym:
            best.offer(scale, _optimal_zero(w, d, scale, zero, maxq))
    return best.scale, best.zero


def _search_symmetric(best: _Best, w: torch.Tensor) -> None:
    """Shrink ``max|w|``: a coarse sweep, then a finer one around each group's best fraction."""
    full_scale = w.abs().amax(dim=-1) * 2 / best.maxq
    half = torch.full_like(full_scale, float((best.maxq + 1) // 2))
    best_shrink = torch.ones_like(full_scale)
    for shrink in _SHRINKS:
        best_shrink = torch.where(best.offer(storable_scale(full_scale * shrink), half), shrink, best_shrink)
    centre = best_shrink
    for step in range(1, _FINE_STEPS + 1):
        for sign in (-1.0, 1.0):
            shrink = (centre + sign * step * _FINE_STEP).clamp(_FINE_STEP, 1.0)
            best.offer(storable_scale(full_scale * shrink), half)


def _search_asymmetric(best: _Best, w: torch.Tensor) -> None:
    """Shrink each end of ``[xmin, xmax]`` on its own (a one-sided outlier should cost only its own side):
    every pair of a coarse set of fractions, then the neighbours of each group's best pair at two finer
    steps; last, the zero that is optimal for the best scale's codes."""
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    best_low = torch.ones_like(xmin)
    best_high = torch.ones_like(xmax)

    def offer(low: torch.Tensor | float, high: torch.Tensor | float) -> None:
        nonlocal best_low, best_high
        lo, hi = xmin * low, xmax * high
        scale = storable_scale((hi - lo) / best.maxq)
        took = best.offer(scale, torch.round(-lo / scale).clamp(0, best.maxq))
        best_low = torch.where(took, low, best_low)
        best_high = torch.where(took, high, best_high)

    for low in _WINDOW_SHRINKS:
        for high in _WINDOW_SHRINKS:
            if low != 1.0 or high != 1.0:
                offer(low, high)
    for step in _WINDOW_STEPS:
        centre_low, centre_high = best_low, best_high
        for dl in (-step, 0.0, step):
            for dh in (-step, 0.0, step):
                if dl or dh:
                    offer((centre_low + dl).clamp(_FINE_STEP, 1.0), (centre_high + dh).clamp(_FINE_STEP, 1.0))
    best.offer(best.scale, _optimal_zero(w, best.d, best.scale, best.zero, best.maxq))


def _minmax(w_group: torch.Tensor, bits: int, sym: bool, weights: torch.Tensor | None = None):
    del weights  # the range does not depend on how much each weight matters
    return group_params(w_group, bits, sym)


GRID_SEARCHES: dict[str, GridSearch] = {"minmax": _minmax, "mse": mse_group_params}
assert tuple(GRID_SEARCHES) == GRIDS, "every grid named in layerwise.core.types.GRIDS needs its search here"


def grid_params(
    w_group: torch.Tensor, bits: int, sym: bool, grid: str = "minmax", weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of the group(s) along the last dimension of `w_group`, chosen by grid `grid`.

    `weights` (per-weight importance, broadcast against `w_group`) is read by the ``mse`` grid only.
    """
    search = GRID_SEARCHES.get(grid)
    if search is None:
        raise LayerwiseError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    return search(w_group, bits, sym, weights)


def grouped_params(
    weight: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_features, n_groups) scales and zeros of the contiguous column groups of a 2-D `weight`.

    `importance` is one value per input column (a Hessian diagonal) or None. A few rows at a time, so the
    search's temporaries stay small; the last group may be shorter (padded with zero weights of zero
    importance, which change neither the range nor the error).
    """
    out_features, in_features = weight.shape
    n_groups = spec.n_groups(in_features)
    width = spec.group_size if n_groups > 1 else in_features
    pad = n_groups * width - in_features
    d = None
    if spec.grid != "minmax":
        d = torch.ones(in_features, device=weight.device) if importance is None else importance.to(torch.float32)
        d = F.pad(d, (0, pad)).view(n_groups, width)
    scale = torch.empty(out_features, n_groups, dtype=torch.float32, device=weight.device)
    zero = torch.empty_like(scale)
    for rows in row_chunks(out_features, n_groups * width):
        w = F.pad(weight[rows].to(torch.float32), (0, pad)).view(rows.stop - rows.start, n_groups, width)
        scale[rows], zero[rows] = grid_params(w, spec.bits, spec.sym, spec.grid, d)
    return scale, zero
