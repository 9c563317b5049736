"""Orthogonal matrices for rotations: orthonormal in float64 for every width, built from the constructions
they name, and reproducible from their seed."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.core.errors import LayerwiseError
from layerwise.transform.hadamard import hadamard_factors, orthogonal, paley1, paley2, sylvester

EYE_TOLERANCE = 1e-10
DENSE_WIDTHS = (1, 2, 12, 20, 28, 64, 100, 63, 576, 896, 960, 1536, 2048)
WIDE = (4096, 14336)


def _factor_product(names: tuple[str, ...]) -> int:
    return math.prod(int(name.partition(":")[2]) for name in names)


@pytest.mark.parametrize("n", DENSE_WIDTHS)
def test_dense_matrix_is_orthonormal(n):
    q = orthogonal(n, seed=5).matrix()
    eye = torch.eye(n, dtype=torch.float64)
    assert q.dtype == torch.float64
    assert (q @ q.T - eye).abs().max().item() < EYE_TOLERANCE
    assert (q.T @ q - eye).abs().max().item() < EYE_TOLERANCE


@pytest.mark.parametrize("n", WIDE)
def test_wide_matrix_rows_are_orthonormal(n):
    """The full n x n product is n³; 256 rows against themselves and a round trip check the same factors."""
    rot = orthogonal(n, seed=2)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:256]
    picked = rot.right(torch.eye(n, dtype=torch.float64)[rows])  # rows of Q
    assert (picked @ picked.T - torch.eye(256, dtype=torch.float64)).abs().max().item() < EYE_TOLERANCE
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert (rot.right_t(rot.right(x)) - x).abs().max().item() < EYE_TOLERANCE
    assert not rot.spec.fallback


@pytest.mark.parametrize("n", (576, 896, 960, 1536, 2048, 3072, 4096, 5120, 8960, 14336))
def test_widths_of_real_models_have_a_hadamard_construction(n):
    spec = orthogonal(n).spec
    assert not spec.fallback and _factor_product(spec.factors) == n
    assert all(name.split(":")[0] in {"sylvester", "paley1", "paley2"} for name in spec.factors)


@pytest.mark.parametrize("n", (100, 63, 50))
def test_widths_without_a_construction_fall_back_and_say_so(n):
    spec = orthogonal(n).spec
    assert spec.fallback and any(name.startswith("random:") for name in spec.factors)
    assert _factor_product(spec.factors) == n
    assert "random block" in spec.describe()


def test_paley_constructions_are_hadamard_matrices():
    for q in (3, 7, 11, 19, 43):
        h = paley1(q)
        assert set(h.unique().tolist()) == {-1.0, 1.0}
        assert torch.equal(h @ h.T, (q + 1) * torch.eye(q + 1, dtype=torch.float64))
    for q in (5, 13, 17, 37):
        h = paley2(q)
        assert set(h.unique().tolist()) == {-1.0, 1.0}
        assert torch.equal(h @ h.T, 2 * (q + 1) * torch.eye(2 * (q + 1), dtype=torch.float64))
    assert torch.equal(sylvester(8) @ sylvester(8).T, 8 * torch.eye(8, dtype=torch.float64))


def test_paley_needs_the_right_prime():
    with pytest.raises(LayerwiseError, match="Paley I needs"):
        paley1(13)
    with pytest.raises(LayerwiseError, match="Paley II needs"):
        paley2(11)
    with pytest.raises(LayerwiseError, match="power of two"):
        sylvester(12)


def test_factors_multiply_to_the_width():
    for n in (12, 24, 40, 56, 72, 88, 120, 144, 200, 320, 448, 640, 768, 1280):
        assert _factor_product(tuple(hadamard_factors(n))) == n


@pytest.mark.parametrize("kind", ("hadamard", "random"))
def test_same_seed_same_matrix_other_seed_other_matrix(kind):
    a, b, c = orthogonal(96, kind, seed=1), orthogonal(96, kind, seed=1), orthogonal(96, kind, seed=2)
    assert torch.equal(a.matrix(), b.matrix())
    assert a.spec == b.spec
    assert (a.matrix() - c.matrix()).abs().max().item() > 0.1


def test_application_matches_the_dense_matrix():
    rot = orthogonal(960, seed=3)
    x = torch.randn(5, 960, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = rot.matrix()
    assert torch.allclose(rot.right(x), x @ dense, atol=1e-12)
    assert torch.allclose(rot.right_t(x), x @ dense.T, atol=1e-12)


def test_random_kind_is_orthonormal():
    q = orthogonal(80, "random", seed=4).matrix()
    assert (q @ q.T - torch.eye(80, dtype=torch.float64)).abs().max().item() < EYE_TOLERANCE


def test_spec_round_trips_through_a_dict():
    spec = orthogonal(576, seed=9).spec
    assert type(spec).from_dict(spec.to_dict()) == spec


def test_bad_requests_are_refused():
    with pytest.raises(LayerwiseError, match="unknown rotation 'givens'"):
        orthogonal(64, "givens")
    with pytest.raises(LayerwiseError, match="positive integer width"):
        orthogonal(0)
