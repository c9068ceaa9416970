"""Tests of the blocked Gram/cosine/MDS math and the PCA helpers against slow, obvious numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trajscope.functional.gram import (cosine_from_gram, gram, gram_accumulate_, mds_from_vectors,
                                       mean_offdiagonal, window_mds_from_vectors, window_mean_offdiagonal,
                                       window_starts)
from trajscope.functional.pca import (components_for, explained_variance_ratio, gram_pca,
                                      participation_ratio, vectors_pca)


# ----------------------------------------------------------------------------- references
def ref_cos(X: np.ndarray) -> np.ndarray:
    n = len(X)
    C = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            a, b = np.linalg.norm(X[i]), np.linalg.norm(X[j])
            if a > 0 and b > 0:
                C[i, j] = X[i] @ X[j] / (a * b)
    return C


def ref_mds(C: np.ndarray, diagonal: bool = False) -> float:
    vals = [C[i, j] for i in range(len(C)) for j in range(len(C))
            if (diagonal or i != j) and np.isfinite(C[i, j])]
    return float(np.mean(vals)) if vals else math.nan


def ref_windows(C: np.ndarray, width: int, stride: int, diagonal: bool = False) -> list[float]:
    n = len(C)
    starts = list(range(0, n - width + 1, stride))
    if starts[-1] != n - width:
        starts.append(n - width)
    return [ref_mds(C[a:a + width, a:a + width], diagonal) for a in starts]


def data(n=13, d=50, zero_rows=(4,), seed=0) -> np.ndarray:
    X = np.random.default_rng(seed).normal(size=(n, d)) + 0.5
    X[list(zero_rows)] = 0.0
    return X


# ----------------------------------------------------------------------------- Gram
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [1, 4, 512])
def test_gram_matches_numpy_in_blocks_and_chunks(dtype, block):
    X = data(n=11, d=300)
    Y = data(n=7, d=300, seed=1)
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    G = gram(torch.tensor(X, dtype=dtype), chunk=64, block=block)
    assert G.dtype == torch.float64
    np.testing.assert_allclose(G.numpy(), X @ X.T, rtol=tol, atol=tol * 100)
    H = gram(torch.tensor(X, dtype=dtype), torch.tensor(Y, dtype=dtype), chunk=100, block=block)
    np.testing.assert_allclose(H.numpy(), X @ Y.T, rtol=tol, atol=tol * 100)


def test_gram_accumulate_adds_in_place():
    X = torch.randn(9, 20, dtype=torch.float64)
    G = torch.ones(9, 9, dtype=torch.float64)
    gram_accumulate_(G, X, block=2)
    torch.testing.assert_close(G, 1 + X @ X.T)


def test_cosine_from_gram_zero_vectors_are_nan():
    X = data()
    C = cosine_from_gram(torch.tensor(X @ X.T))
    np.testing.assert_allclose(C.numpy(), ref_cos(X), atol=1e-12)
    assert torch.isnan(C[4]).all() and torch.isnan(C[:, 4]).all()
    assert C[0, 0] == 1.0


@pytest.mark.parametrize("diagonal", [False, True])
def test_mds_map_and_vector_forms_match_brute_force(diagonal):
    X = data(n=17, zero_rows=(0, 9))
    C = ref_cos(X)
    expected = ref_mds(C, diagonal)
    assert mean_offdiagonal(torch.tensor(C), diagonal) == pytest.approx(expected, abs=1e-12)
    assert mds_from_vectors(torch.tensor(X), diagonal) == pytest.approx(expected, abs=1e-12)
    assert mds_from_vectors(torch.tensor(X, dtype=torch.float32), diagonal) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("width,stride", [(2, 1), (3, 1), (4, 2), (5, 3), (17, 1), (6, 4)])
@pytest.mark.parametrize("diagonal", [False, True])
def test_window_mds_both_forms_match_brute_force(width, stride, diagonal):
    X = data(n=17, zero_rows=(3,))
    C = ref_cos(X)
    expected = ref_windows(C, width, stride, diagonal)
    got_map = window_mean_offdiagonal(torch.tensor(C), width, stride, diagonal).numpy()
    got_vec = window_mds_from_vectors(torch.tensor(X), width, stride, diagonal).numpy()
    np.testing.assert_allclose(got_map, expected, atol=1e-12)
    np.testing.assert_allclose(got_vec, expected, atol=1e-12)
    assert len(window_starts(17, width, stride)) == len(expected)


def test_window_starts_cover_the_end():
    assert window_starts(10, 4, 3).tolist() == [0, 3, 6]
    assert window_starts(10, 4, 4).tolist() == [0, 4, 6]
    assert window_starts(3, 4, 1).tolist() == []


def test_mds_of_fewer_than_two_nonzero_vectors_is_nan():
    assert math.isnan(mds_from_vectors(torch.zeros(3, 4)))
    assert math.isnan(mean_offdiagonal(cosine_from_gram(torch.eye(1, dtype=torch.float64))))


# ----------------------------------------------------------------------------- PCA
def ref_pca(X: np.ndarray):
    Xc = X - X.mean(0)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    return s ** 2, Xc @ Vt.T


@pytest.mark.parametrize("shape", [(12, 40), (40, 6)])
def test_pca_from_gram_and_vectors_match_svd(shape):
    X = np.random.default_rng(2).normal(size=shape) * np.linspace(3, 0.1, shape[1]) + 7.0
    lam_ref, coords_ref = ref_pca(X)
    r = min(shape) - 1
    for pca in (gram_pca(torch.tensor(X @ X.T)), vectors_pca(torch.tensor(X)), vectors_pca(torch.tensor(X), chunk=7)):
        np.testing.assert_allclose(pca.eigenvalues[:r].numpy(), lam_ref[:r], rtol=1e-9)
        # coordinates agree up to the sign of each axis; our sign makes the last point >= 0
        got = pca.coords[:, :r].numpy()
        np.testing.assert_allclose(np.abs(got), np.abs(coords_ref[:, :r]), atol=1e-8)
        assert (got[-1] >= -1e-12).all()
        # the weights rebuild the unit axes from the points, and each axis's weights sum to 0
        axes = X.T @ pca.weights[:, :r].numpy()  # (d, r)
        np.testing.assert_allclose(np.linalg.norm(axes, axis=0), 1.0, rtol=1e-8)
        np.testing.assert_allclose((X - X.mean(0)) @ axes, got, atol=1e-8)
        np.testing.assert_allclose(pca.weights.sum(0).numpy(), 0.0, atol=1e-10)


def test_pca_summaries_closed_forms():
    lam = torch.tensor([4.0, 4.0, 2.0, 0.0], dtype=torch.float64)
    assert explained_variance_ratio(lam).tolist() == [0.4, 0.4, 0.2, 0.0]
    assert components_for(lam, 0.8) == 2
    assert components_for(lam, 0.9) == 3
    assert participation_ratio(lam) == pytest.approx(100 / 36)
    assert participation_ratio(torch.tensor([5.0, 0.0])) == 1.0
    assert participation_ratio(torch.ones(7)) == pytest.approx(7.0)
    assert math.isnan(participation_ratio(torch.zeros(3)))
    assert components_for(torch.zeros(3), 0.9) == 0
