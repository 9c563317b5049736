"""`CompensatedSum`: a running sum of tensors whose value does not depend on the order or the grouping of the
additions, so that N processes that each add their share of the terms, and then add their partial sums in
rank order, get the bits one process gets adding every term in turn.

A float sum rounds at every addition, and the roundings depend on what was added before: one process adding
windows 0, 1, 2, 3 and two ranks adding 0, 2 and 1, 3 before adding the two parts give sums a few ulps apart,
and GPTQ's error feedback turns one ulp in a Hessian into different codes. Here each term is added into a
pair ``(hi, lo)`` (Knuth's two-sum: ``hi`` the float64 sum, ``lo`` the sum of the exact roundings ``hi``
made, kept in float32 since they are 2**-53 of ``hi``), which carries about 77 bits. Two groupings of the
same terms then differ by about ``2**-75`` of the sum; `value` rounds the pair to float64, and its callers
round that to float32, which gives the same bits unless a sum falls within that distance of a float32
rounding boundary: about once in 2**50 entries.

Costs: 12 bytes per entry (three times a float32 sum) and eight float64 passes per addition, taken a piece
at a time so the scratch stays small.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from layerwise.core import dist

# Elements per step of an addition: on a CPU few enough that the step's float64 scratch stays in cache (8x
# faster than whole-matrix temporaries on a 1536-wide sum), on a GPU enough that kernel launches do not dominate.
CPU_STEP, DEVICE_STEP = 2**16, 2**22


def _two_sum_into(hi: torch.Tensor, lo: torch.Tensor, terms: torch.Tensor, scratch: torch.Tensor) -> None:
    """``(hi, lo) += terms`` in place, for 1-D pieces: `hi` takes the float64 sum, `lo` adds the rounding error
    it made, which Knuth's two-sum finds exactly. `scratch` is float64, (3, n) at least."""
    n = hi.numel()
    total, taken, rest = scratch[0, :n], scratch[1, :n], scratch[2, :n]
    rest.copy_(terms)  # exact: every narrower float is a float64
    torch.add(hi, rest, out=total)
    torch.sub(total, hi, out=taken)  # the part of the terms the float64 sum holds
    rest.sub_(taken)  # what the sum dropped of the terms
    torch.sub(total, taken, out=taken)
    hi.sub_(taken).add_(rest)  # plus what it dropped of hi: the exact error
    lo.add_(hi)
    hi.copy_(total)


def _steps(hi: torch.Tensor, *others: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Matching 1-D pieces of `hi` and `others` (all of its shape), with the float64 scratch for each."""
    step = CPU_STEP if hi.device.type == "cpu" else DEVICE_STEP
    n = hi.numel()
    scratch = torch.empty(3, min(step, n), dtype=torch.float64, device=hi.device)
    flat = [t.reshape(-1) for t in (hi, *others)]
    for start in range(0, n, step):
        yield (*(t[start:start + step] for t in flat), scratch)


def _add_pair(hi: torch.Tensor, lo: torch.Tensor, other_hi: torch.Tensor, other_lo: torch.Tensor) -> None:
    """``(hi, lo) += (other_hi, other_lo)`` in place."""
    for h, lo_, oh, ol, scratch in _steps(hi, lo, other_hi, other_lo):
        _two_sum_into(h, lo_, oh, scratch)
        lo_.add_(ol)


class CompensatedSum:
    """The sum of every tensor `add`-ed into a flat run of `size` entries, kept as a compensated pair on `device`.

    `add(terms, at)` adds `terms` (flattened) to the entries from `at` on, so a caller can lay several blocks
    of its own shapes one after another; `value` reads a run of entries back in float64.
    """

    def __init__(self, size: int, device: torch.device | str | None = None) -> None:
        self._hi = torch.zeros(size, dtype=torch.float64, device=device)
        self._lo = torch.zeros(size, dtype=torch.float32, device=device)

    @property
    def device(self) -> torch.device:
        return self._hi.device

    @property
    def size(self) -> int:
        return self._hi.numel()

    def add(self, terms: torch.Tensor, at: int = 0) -> None:
        """Add `terms` (any float dtype, cast to float64 exactly, which every narrower float is) to the entries
        from `at` on."""
        n = terms.numel()
        if not 0 <= at <= self.size - n:
            raise ValueError(f"{n} terms at entry {at} do not fit in a sum of {self.size} entries")
        span = slice(at, at + n)
        for hi, lo, piece, scratch in _steps(self._hi[span], self._lo[span], terms.reshape(-1).to(self.device)):
            _two_sum_into(hi, lo, piece, scratch)

    def merge_ranks(self) -> None:
        """Make this the sum over every rank of a process group (each adding its own terms first): rank 0 adds
        the ranks' pairs in rank order, one rank at a time, and sends the sum, rounded to float64 as `value`
        rounds it, back. Each rank sends 12 bytes per entry and receives 8; nothing happens on one process."""
        if dist.is_alone():
            return
        # The sums were made in the forwards' inference mode; their in-place updates must be made in it too.
        with torch.inference_mode(self._hi.is_inference()):
            dist.fold_at_main([self._hi, self._lo], lambda other: _add_pair(self._hi, self._lo, *other))
            if dist.is_main():
                self._hi.add_(self._lo)
            self._lo.zero_()
            dist.broadcast_from_main([self._hi])

    def value(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Entries `start` to `stop` (all by default) of the sum, each rounded once to float64 (a new tensor)."""
        span = slice(start, self.size if stop is None else stop)
        return self._hi[span] + self._lo[span]


def exact_total(values: torch.Tensor) -> float:
    """The sum of every entry of `values`, the same bits on any thread count: each row of the last dimension
    summed in float64 (a row is one thread's work, in a fixed order), then those row sums added exactly and
    rounded once (`math.fsum`). A plain ``values.sum()`` splits its work by the thread count, and its last
    bits change with it."""
    rows = values.detach().double().reshape(-1, values.shape[-1] if values.dim() else 1).sum(dim=-1)
    return math.fsum(rows.tolist())
