"""PCA of a set of points (a trajectory), from their Gram matrix or from the points themselves.

The n points x_1..x_n are centered at their mean (each point weighs 1/n).  With ``Xc`` the centered
(n, d) matrix, the eigenvalues ``lam`` of ``Xc Xc^T`` (equal to the nonzero ones of ``Xc^T Xc``) are
the **sums of squared deviations** along the principal axes, largest first; the explained variance
ratio is ``lam / sum(lam)`` and the variance per point ``lam / n``.  Coordinates of the points in the
principal axes are ``U sqrt(lam)`` (U the eigenvectors of the centered Gram), which is ``Xc V``.

Sign convention (so that results are reproducible): each axis is oriented so that the last point has
a coordinate >= 0 (if it is ~0, the point with the largest |coordinate| is made positive).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PCA", "center_gram", "gram_pca", "vectors_pca", "explained_variance_ratio",
           "components_for", "participation_ratio"]


class PCA(NamedTuple):
    """``eigenvalues`` (min(n, d),) float64, all of them, descending (sums of squared deviations);
    ``coords`` (n, r) of the points in the top r axes; ``weights`` (n, r): axis j is the unit vector
    ``sum_i weights[i, j] x_i`` (each column sums to 0), for axes with ``lam > 0`` (0 elsewhere)."""

    eigenvalues: Tensor
    coords: Tensor
    weights: Tensor


def center_gram(G: Tensor) -> Tensor:
    """Gram of the centered points ``H G H`` with ``H = I - 11^T / n``; (n, n) -> (n, n) float64."""
    G = G.to(torch.float64)
    r = G.mean(1, keepdim=True)
    return G - r - r.T + G.mean()


def _orient(coords: Tensor) -> Tensor:
    """Signs (r,) that make the last point's coordinate >= 0 (module docstring)."""
    last = coords[-1]
    big = coords.gather(0, coords.abs().argmax(0, keepdim=True))[0]
    scale = coords.abs().amax(0).clamp_min(torch.finfo(coords.dtype).tiny)
    ref = torch.where(last.abs() > 1e-9 * scale, last, big)
    return torch.where(ref < 0, -1.0, 1.0).to(coords.dtype)


def gram_pca(G: Tensor, rank: int | None = None) -> PCA:
    """PCA of n points given only their (uncentered) Gram matrix G (n, n), by ``eigh`` of the
    centered Gram.  Eigenvalues below ``n * eps * max`` are set to 0.  ``rank``: coordinates and
    weights of the top ``rank`` axes only (default all)."""
    n = G.shape[0]
    lam, U = torch.linalg.eigh(center_gram(G))  # ascending
    lam, U = lam.flip(0), U.flip(1)
    tol = max(n, 1) * torch.finfo(torch.float64).eps * float(lam[0].abs()) if n else 0.0
    lam = torch.where(lam > tol, lam, torch.zeros_like(lam))
    top, U = lam[:rank], U[:, :rank]
    coords = U * top.sqrt()  # (n, r)
    sign = _orient(coords) if n else torch.ones(0, dtype=lam.dtype)
    coords, U = coords * sign, U * sign
    inv = torch.where(top > 0, top.rsqrt(), torch.zeros_like(top))
    weights = (U - U.mean(0, keepdim=True)) * inv  # H U lam^(-1/2); H U = U when lam > 0
    return PCA(lam, coords, weights)


def vectors_pca(X: Tensor, rank: int | None = None, chunk: int = 16384) -> PCA:
    """PCA of the rows of X (n, d) (any d; e.g. sketches).  ``eigh`` of the smaller of the centered
    Gram (n, n) and covariance (d, d), in float64; the covariance and the coordinates are formed
    ``chunk`` rows at a time (memory O(chunk d + d^2) beyond X).  ``rank`` and ``weights`` as in
    :func:`gram_pca`."""
    n, d = X.shape
    if n <= d:
        X = X.to(torch.float64)
        return gram_pca(X @ X.T, rank)
    mean = X.sum(0, dtype=torch.float64) / n  # (d,)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for a in range(0, n, chunk):
        Xc = X[a:a + chunk].to(torch.float64) - mean
        cov.addmm_(Xc.T, Xc)
    lam, V = torch.linalg.eigh(cov)  # ascending
    lam, V = lam.flip(0), V.flip(1)
    tol = n * torch.finfo(torch.float64).eps * float(lam[0].abs())
    lam = torch.where(lam > tol, lam, torch.zeros_like(lam))
    top, V = lam[:rank], V[:, :rank]
    coords = torch.cat([(X[a:a + chunk].to(torch.float64) - mean) @ V for a in range(0, n, chunk)])  # (n, r)
    coords = coords * _orient(coords)
    inv = torch.where(top > 0, 1.0 / top, torch.zeros_like(top))
    weights = coords * inv  # axis j = Xc^T coords_j / lam_j = sum_i w_ij x_i (columns sum to 0)
    return PCA(lam, coords, weights)


def explained_variance_ratio(eigenvalues: Tensor) -> Tensor:
    """``lam / sum(lam)`` (all NaN if every eigenvalue is 0)."""
    lam = eigenvalues.to(torch.float64)
    return lam / lam.sum()


def components_for(eigenvalues: Tensor, fraction: float) -> int:
    """The fewest leading components whose explained variance ratios sum to >= ``fraction``
    (0 if the points do not vary).  A relative tolerance of 1e-9 absorbs rounding."""
    ratio = explained_variance_ratio(eigenvalues)
    if not torch.isfinite(ratio).all() or len(ratio) == 0:
        return 0
    reached = ratio.cumsum(0) >= fraction - 1e-9
    return int(reached.to(torch.int64).argmax()) + 1


def participation_ratio(eigenvalues: Tensor) -> float:
    """Effective dimension ``(sum lam)^2 / sum lam^2``: 1 for a line, k for k equal axes, NaN if
    the points do not vary."""
    lam = eigenvalues.to(torch.float64)
    s2 = float((lam * lam).sum())
    return float(lam.sum()) ** 2 / s2 if s2 > 0 else float("nan")
