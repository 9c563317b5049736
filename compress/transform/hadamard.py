"""Orthogonal matrices of any width, seeded and reproducible, for rotating weights.

A width n is factored as ``n = f_1 * f_2 * ... * f_k`` where each factor has a Hadamard matrix of a known
construction, and the rotation is ``Q = D (H_1 ⊗ H_2 ⊗ ... ⊗ H_k) / sqrt(n)``, D a seeded random ±1
diagonal. The factors:

- ``sylvester:2^m``: Sylvester's construction, ``H_2m = H_2 ⊗ H_m``.
- ``paley1:q+1``: Paley I, q a prime with q ≡ 3 (mod 4): ``I + [[0, 1ᵀ], [-1, C]]`` with C the Jacobsthal
  matrix ``C[a, b] = χ(a - b)`` (χ the quadratic character mod q).
- ``paley2:2(q+1)``: Paley II, q a prime with q ≡ 1 (mod 4): the symmetric conference matrix
  ``S = [[0, 1ᵀ], [1, C]]`` with each 0 replaced by ``[[1, -1], [-1, -1]]`` and each ±1 by ``±[[1, 1], [1, -1]]``.
- ``random:m``: no Hadamard matrix of a known construction fits (an odd part m > 1, or a part no Paley order
  divides): a seeded random orthogonal block (QR of a Gaussian, signs fixed by R's diagonal). The
  description says so (`OrthogonalSpec.fallback`).

Examples: 576 = 12·12·4, 896 = 28·32, 960 = 12·20·4, 1536 = 12·128, 14336 = 28·512.

Everything is built in float64. Applying Q to a tensor never forms the n×n matrix: the factors are merged
into two dense blocks of about √n each (``H_2^m = H_2^a ⊗ H_2^(m-a)`` lets the Sylvester part split
anywhere), and each block is one matrix product along its axis of the reshaped tensor: ``O(n (a + b))`` per
row instead of ``O(n²)``, in products large enough for BLAS to run them well.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from layerwise.core.errors import LayerwiseError

ROTATION_KINDS = ("hadamard", "random")
_MAX_RANDOM_BLOCK = 8192  # a random fallback block is dense: m x m float64 and an m³ QR


@dataclass(frozen=True)
class OrthogonalSpec:
    """What `orthogonal` built: enough to rebuild the same matrix, and to tell a reader what was applied.

    `factors` name the Kronecker factors in order (``"paley1:12"``, ``"sylvester:128"``, ``"random:25"``);
    `signs`: whether the random ±1 diagonal multiplies it; `fallback`: a random block stands in where no
    Hadamard construction fits.
    """

    kind: str
    size: int
    factors: tuple[str, ...]
    seed: int
    signs: bool = True
    fallback: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "factors": list(self.factors)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OrthogonalSpec:
        return cls(**{**data, "factors": tuple(data["factors"])})

    def describe(self) -> str:
        body = " ⊗ ".join(self.factors)
        signs = "random signs · " if self.signs else ""
        return f"{signs}{body}" + (" (random block: no Hadamard construction of this width)" if self.fallback else "")


class Orthogonal:
    """An orthonormal n×n matrix Q held as ``diag(signs) · (A ⊗ B)`` in float64 (A, B orthonormal blocks)."""

    def __init__(self, spec: OrthogonalSpec, blocks: list[torch.Tensor], signs: torch.Tensor) -> None:
        self.spec = spec
        self.blocks = blocks
        self.signs = signs

    @property
    def size(self) -> int:
        return self.spec.size

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q`` over the last axis, in float64 on x's device."""
        x = x.to(torch.float64) * self.signs.to(x.device)
        return _kron_apply(x, self.blocks, transpose=False)

    def right_t(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Qᵀ`` over the last axis: undoes `right`."""
        return _kron_apply(x.to(torch.float64), self.blocks, transpose=True) * self.signs.to(x.device)

    def matrix(self) -> torch.Tensor:
        """The dense n×n matrix (for tests and small widths)."""
        return self.right(torch.eye(self.size, dtype=torch.float64))


def _kron_apply(x: torch.Tensor, blocks: list[torch.Tensor], transpose: bool) -> torch.Tensor:
    """``x @ (A ⊗ B)`` (or its transpose) over the last axis, which is viewed as (a, b) in row-major order:
    B contracts the b axis, then A the a axis (one or no block: a plain product, or x itself)."""
    shape = x.shape
    mats = [(m.T if transpose else m).to(x.device) for m in blocks]
    if not mats:
        return x
    if len(mats) == 1:
        return x @ mats[0]
    left, right = mats
    a, b = left.shape[0], right.shape[0]
    y = (x.reshape(-1, b) @ right).reshape(-1, a, b)
    y = (y.transpose(1, 2).reshape(-1, a) @ left).reshape(-1, b, a).transpose(1, 2)
    return y.reshape(shape)


def orthogonal(n: int, kind: str = "hadamard", seed: int = 0) -> Orthogonal:
    """A seeded orthonormal n×n matrix: a randomized Hadamard (`kind` ``hadamard``) or a random orthogonal
    one (``random``: QR of a Gaussian). The same (n, kind, seed) gives the same matrix on every machine."""
    if kind not in ROTATION_KINDS:
        raise LayerwiseError(f"unknown rotation {kind!r}; choose one of {', '.join(ROTATION_KINDS)}")
    if not isinstance(n, int) or n < 1:
        raise LayerwiseError(f"a rotation needs a positive integer width, got {n!r}")
    generator = torch.Generator().manual_seed(_stream(seed, n))
    if kind == "random":
        _check_random_width(n, "a random rotation")
        block = random_orthogonal(n, generator)
        return Orthogonal(OrthogonalSpec(kind, n, (f"random:{n}",), seed, signs=False), [block], torch.ones(n,
                          dtype=torch.float64))
    names = hadamard_factors(n)
    fallback = any(name.startswith("random:") for name in names)
    others = [_factor_matrix(name, generator) for name in names if not name.startswith("sylvester:")]
    power = n // math.prod(m.shape[0] for m in others)
    signs = (torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1).to(torch.float64)
    return Orthogonal(OrthogonalSpec(kind, n, tuple(names), seed, True, fallback), _two_blocks(others, power), signs)


def _two_blocks(others: list[torch.Tensor], power: int) -> list[torch.Tensor]:
    """``others[0] ⊗ ... ⊗ others[-1] ⊗ H_power / √power`` as at most two orthonormal blocks A ⊗ B, split where
    a + b is smallest (the Sylvester part may split anywhere: H_2^m = H_2^s ⊗ H_2^(m-s))."""
    m = power.bit_length() - 1
    splits = [(others[:i], 0, others[i:], m) for i in range(len(others))]
    splits += [(others, s, [], m - s) for s in range(m + 1)]

    def block(parts: list[torch.Tensor], exponent: int) -> torch.Tensor:
        out = sylvester(2**exponent) / math.sqrt(2**exponent)
        for part in reversed(parts):
            out = torch.kron(part, out)
        return out

    def width(parts: list[torch.Tensor], exponent: int) -> int:
        return math.prod(p.shape[0] for p in parts) * 2**exponent

    left, s_left, right, s_right = min(splits, key=lambda t: width(t[0], t[1]) + width(t[2], t[3]))
    blocks = [block(left, s_left), block(right, s_right)]
    return [b for b in blocks if b.shape[0] > 1]


def _stream(seed: int, n: int) -> int:
    """A generator seed from (seed, width): widths of one run draw independent signs."""
    return int(np.random.SeedSequence([int(seed), int(n)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def random_orthogonal(m: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal m×m in float64: QR of a Gaussian, each column's sign fixed by R's diagonal
    (without the fix QR's sign convention biases the distribution)."""
    q, r = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(m, dtype=torch.float64))


def _check_random_width(m: int, what: str) -> None:
    if m > _MAX_RANDOM_BLOCK:
        raise LayerwiseError(f"{what} of width {m} needs a dense {m}x{m} QR; widths above {_MAX_RANDOM_BLOCK} are "
                             "not offered (use the hadamard rotation)")


def _factor_matrix(name: str, generator: torch.Generator) -> torch.Tensor:
    """The orthonormal matrix of one named Paley or random factor."""
    family, _, size = name.partition(":")
    n = int(size)
    if family == "random":
        _check_random_width(n, "the fallback block")
        return random_orthogonal(n, generator)
    matrix = paley1(n - 1) if family == "paley1" else paley2(n // 2 - 1)
    return matrix / math.sqrt(n)


def hadamard_factors(n: int) -> list[str]:
    """Names of Kronecker factors whose Hadamard matrices multiply to width n: Paley factors (the split with
    the smallest sum of widths, the cheapest to apply) times one Sylvester power of two; a random block for
    the odd part where no construction covers it."""
    power = n & -n  # the largest power of two dividing n
    found = _paley_split(n // power, power)
    if found is None:
        # The odd part has no construction; a random block of the smallest width that leaves a power of two.
        odd = n // power
        return [f"random:{odd}"] + ([f"sylvester:{power}"] if power > 1 else [])
    paley, power = found
    return paley + ([f"sylvester:{power}"] if power > 1 else [])


def _paley_split(odd: int, power: int) -> tuple[list[str], int] | None:
    """Paley factors covering `odd` (with some of the power of two), and the power of two left."""
    if odd == 1:
        return [], power
    best: tuple[list[str], int] | None = None
    # Each Paley order is 4·(odd part) or 2·(odd part): try every divisor of odd·power that covers some of odd.
    for order in _paley_orders_dividing(odd * power):
        order_power = order & -order
        order_odd = order // order_power
        if order_odd == 1 or odd % order_odd or power % order_power:
            continue
        rest = _paley_split(odd // order_odd, power // order_power)
        if rest is None:
            continue
        candidate = ([_paley_name(order)] + rest[0], rest[1])
        if best is None or _rank(candidate[0]) < _rank(best[0]):
            best = candidate
    return best


def _rank(names: list[str]) -> tuple[int, int]:
    """Cheapest to apply first (the sum of the factor widths), then fewest factors."""
    return sum(int(name.partition(":")[2]) for name in names), len(names)


@cache
def _paley_orders_dividing(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(4, n + 1) if n % d == 0 and _paley_name(d) is not None)


def _paley_name(order: int) -> str | None:
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return f"paley1:{order}"
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return f"paley2:{order}"
    return None


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def sylvester(n: int) -> torch.Tensor:
    """The ±1 Sylvester Hadamard matrix of order n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise LayerwiseError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """``C[a, b] = χ(a - b)`` over GF(q), q prime: χ(0) = 0, 1 on nonzero squares, -1 otherwise."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[:, None] - idx[None, :]) % q]


def paley1(q: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order q+1 by Paley I (q prime, q ≡ 3 mod 4)."""
    if not (_is_prime(q) and q % 4 == 3):
        raise LayerwiseError(f"Paley I needs a prime q ≡ 3 (mod 4), got {q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def paley2(q: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order 2(q+1) by Paley II (q prime, q ≡ 1 mod 4)."""
    if not (_is_prime(q) and q % 4 == 1):
        raise LayerwiseError(f"Paley II needs a prime q ≡ 1 (mod 4), got {q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = 1.0
    s[1:, 1:] = _jacobsthal(q)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(s, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)
