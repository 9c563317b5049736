"""`CompensatedSum`: the same bits whatever the order and grouping of the additions, where plain float sums
differ; accurate to far below float64's rounding."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from layerwise.core.summation import CompensatedSum, _add_pair, exact_total


def terms(n: int = 24, size: int = 3072, seed: int = 0) -> list[torch.Tensor]:
    """float32 terms over many magnitudes, of both signs: sums that cancel and sums a float sum rounds."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, generator=g) * 10.0 ** torch.randint(-6, 7, (size,), generator=g)).float()
            for _ in range(n)]


def summed(parts: list[torch.Tensor]) -> CompensatedSum:
    total = CompensatedSum(parts[0].numel())
    for part in parts:
        total.add(part)
    return total


def grouped(parts: list[torch.Tensor], groups: int) -> torch.Tensor:
    """As `groups` ranks would sum them: every `groups`-th term each, then the partial sums added in order."""
    sums = [summed(parts[g::groups]) for g in range(groups)]
    for other in sums[1:]:
        _add_pair(sums[0]._hi, sums[0]._lo, other._hi, other._lo)
    return sums[0].value()


def test_order_and_grouping_do_not_change_the_bits_where_a_float_sum_does():
    parts = terms()
    reference = summed(parts).value()
    shuffled = [parts[i] for i in torch.randperm(len(parts), generator=torch.Generator().manual_seed(1))]
    assert torch.equal(summed(shuffled).value(), reference)
    for groups in (2, 3, 5):
        assert torch.equal(grouped(parts, groups), reference), groups
    # The same terms in plain float64 sums, in the two orders: different bits (what this module is for).
    plain = sum(p.double() for p in parts)
    plain_shuffled = sum(p.double() for p in shuffled)
    assert not torch.equal(plain, plain_shuffled)


def test_the_sum_is_the_exact_sum_rounded_once():
    parts = terms(n=16, size=30, seed=3)
    value = summed(parts).value()
    for i in range(30):
        exact = sum(Fraction(float(p[i])) for p in parts)
        assert float(value[i]) == float(exact), i  # float() of a Fraction rounds once, to nearest


def test_terms_go_where_they_are_placed_and_must_fit():
    total = CompensatedSum(10)
    total.add(torch.ones(2, 2), at=3)
    total.add(torch.full((3,), 0.5), at=6)
    assert total.value().tolist() == [0, 0, 0, 1, 1, 1, 1.5, 0.5, 0.5, 0]
    assert total.value(6, 8).tolist() == [1.5, 0.5]
    with pytest.raises(ValueError, match="do not fit"):
        total.add(torch.ones(4), at=7)


def test_exact_total_has_the_same_bits_on_any_thread_count():
    """A window's worth of squared errors (2048 tokens x 576), values spread over six decades: torch's
    whole-tensor sum splits its work by the thread count and its last bits can change with it; `exact_total`
    sums each row, then the rows exactly, and gives the same bits on 1 and 2 threads."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(1, 2048, 576, dtype=torch.float64, generator=g)
    values *= 10.0 ** torch.randint(-3, 3, values.shape, generator=g)
    threads = torch.get_num_threads()
    exact = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            exact[n] = exact_total(values)
    finally:
        torch.set_num_threads(threads)
    assert exact[1] == exact[2]  # the plain sums differed in their last bits on the machine this was written on
    assert exact[1] == pytest.approx(float(sum(Fraction(v) for v in values.sum(dim=-1).flatten().tolist())), rel=1e-15)
