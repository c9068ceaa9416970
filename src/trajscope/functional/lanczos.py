"""Matrix-free spectral estimates of a symmetric linear operator ``matvec: (P,) -> (P,)``.

Lanczos with full reorthogonalization (:func:`lanczos`, :func:`top_eigenvalues`), Hutchinson's trace
estimator with Rademacher probes and a stopping rule on its standard error (:func:`hutchinson_trace`,
optionally deflated by a Krylov subspace), and stochastic Lanczos quadrature for the spectral
density (:func:`spectral_density`, :func:`gaussian_density`). Everything runs in the dtype and on
the device of the operator's vectors; random draws come from ``generator`` (a ``torch.Generator``)
so that a result is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass
class Eigen:
    """Top-k Ritz pairs, largest first: ``values`` (k,) float64, ``vectors`` (k, P) unit-norm flat
    vectors in the operator's dtype (fewer than k rows only if the Krylov space is smaller),
    ``residuals`` (k,) the relative residuals ``|C y - theta y| / |theta|``, ``n_iter`` Lanczos steps
    (= operator products), ``converged`` whether every residual met the tolerance."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    n_iter: int
    converged: bool


@dataclass
class TraceEstimate:
    """``mean`` the estimate of tr(C), ``stderr`` its standard error, ``n`` the Hutchinson samples,
    ``n_matvec`` operator products in all (samples plus deflation steps)."""

    mean: float
    stderr: float
    n: int
    n_matvec: int


@dataclass
class SpectralDensity:
    """SLQ quadrature: ``nodes`` and ``weights`` (n_probes, steps); each probe's weights sum to 1 and
    the density is their average, an estimate of (1/P) sum_j delta(t - lambda_j). A probe whose
    Lanczos run stopped early (invariant subspace) has zero weights in its unused slots."""

    nodes: Tensor
    weights: Tensor

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        return gaussian_density(self.nodes, self.weights, grid, sigma)


class _Basis:
    """Orthonormal rows q_0..q_{m-1} in a growing (capacity, P) buffer."""

    def __init__(self, dim: int, like: Tensor, capacity: int):
        self.rows, self.m = like.new_empty(max(capacity, 1), dim), 0

    def append(self, q: Tensor) -> None:
        if self.m == len(self.rows):
            self.rows = torch.cat([self.rows, torch.empty_like(self.rows)])
        self.rows[self.m] = q
        self.m += 1

    @property
    def Q(self) -> Tensor:
        return self.rows[:self.m]

    def project_out(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(c, w') with c = Q w (m,) and w' = w - Q^T c - Q^T Q (w - Q^T c): classical Gram-Schmidt
        against every row, always twice (a fixed count of fused matrix-vector products is cheaper on
        small vectors than the norms that decide whether the second pass is needed)."""
        Q = self.Q
        c = Q @ w
        w = torch.addmv(w, Q.T, c, alpha=-1.0)
        return c, w.addmv_(Q.T, Q @ w, alpha=-1.0)

    def orthogonalize(self, w: Tensor) -> Tensor:
        """w minus its projection on the basis (classical Gram-Schmidt), with a second pass when the
        first cancelled most of w (|w'| < |w| / sqrt(2), the "twice is enough" criterion)."""
        Q = self.Q
        before = w.norm()
        w = w - Q.T @ (Q @ w)
        if w.norm() < 0.7071 * before:
            w = w - Q.T @ (Q @ w)
        return w


def _where(generator, device):
    """Draw on the generator's device (a CPU generator can serve a CUDA operator), then move."""
    return generator.device if generator is not None else device


def gaussian(dim: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> Tensor:
    """A (dim,) standard normal vector."""
    return torch.randn(dim, generator=generator, dtype=dtype, device=_where(generator, device)).to(device)


def rademacher(dim: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> Tensor:
    """A (dim,) vector of independent +-1 entries."""
    bits = torch.randint(0, 2, (dim,), generator=generator, device=_where(generator, device))
    return (2 * bits - 1).to(dtype=dtype, device=device)


def _tridiagonal(alphas: list[float], betas: list[float], dtype=torch.float64) -> Tensor:
    return torch.from_numpy(_tridiagonal_np(alphas, betas)).to(dtype)


def _tridiagonal_np(alphas: list[float], betas: list[float]) -> np.ndarray:
    """T (m, m) float64 with ``alphas`` on the diagonal and ``betas`` beside it (NumPy: a few
    microseconds, against ~50 for the same in small torch calls)."""
    m = len(alphas)
    T = np.zeros((m, m))
    T.flat[::m + 1] = alphas
    if m > 1:
        T.flat[1::m + 1] = betas
        T.flat[m::m + 1] = betas
    return T


def lanczos(matvec: MatVec, v0: Tensor, steps: int,
            on_step: Callable[[list, list, float], bool] | None = None) -> tuple[list, list, _Basis]:
    """Lanczos with full reorthogonalization from ``v0`` (P,), at most ``steps`` products.

    Returns ``(alphas, betas, basis)``: T = tridiag(betas, alphas, betas) is Q C Q^T for the rows Q
    (m, P) of ``basis.Q``; ``len(betas) == m - 1``. ``on_step(alphas, betas, beta_next)`` is called
    after each step and stops the run when it returns True. On breakdown (an invariant subspace,
    beta ~ 0) the run stops (the quadrature is then exact).

    Each step: w = C q_j, then w minus its projections on every q_i, twice
    (:meth:`_Basis.project_out`; the first projection on q_j is alpha_j, and the ones on q_{j-1}
    and q_j are the three-term recurrence), beta_j = |w|.
    """
    q = v0 / v0.norm()
    basis = _Basis(q.numel(), q, min(steps, 8))
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for j in range(steps):
        basis.append(q)
        c, w = basis.project_out(matvec(q))
        a = float(c[-1])
        alphas.append(a)
        b = float(w.norm())
        scale = max(scale, abs(a), b)
        breakdown = b <= 1e-10 * max(scale, 1e-30)
        if (on_step is not None and on_step(alphas, betas, 0.0 if breakdown else b)) or breakdown:
            break
        if j + 1 < steps:
            betas.append(b)
            q = w.div_(b)
    return alphas, betas, basis


def top_eigenvalues(matvec: MatVec, dim: int, k: int = 1, tol: float = 1e-3, max_iter: int = 100,
                    v0: Tensor | None = None, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32, device=None, value_tol: float | None = None) -> Eigen:
    """The ``k`` algebraically largest eigenpairs of the symmetric operator by Lanczos.

    Stops when every top-k Ritz pair (theta, y) has relative residual ``|C y - theta y| / |theta|
    <= tol`` (computed from T: ``beta_m |s_{m,i}|``), which guarantees an eigenvalue of C within
    ``tol * |theta|`` of theta (for symmetric C); the error of theta itself is typically much smaller
    (~ residual^2 / gap). Also stops after ``max_iter`` products (``converged=False``). ``v0`` (P,)
    warm-starts the run (e.g. the previous top eigenvector); by default a Gaussian vector from
    ``generator``.
    """
    if max_iter < 1 or k < 1:
        raise ValueError(f"need k >= 1 and max_iter >= 1, got k={k}, max_iter={max_iter}")
    if v0 is None:
        v0 = gaussian(dim, generator, dtype, device)
    v0 = v0.to(dtype=dtype, device=device) if device is not None else v0.to(dtype)
    if float(v0.norm()) == 0.0:
        raise ValueError("the start vector is zero")
    state: dict = {}

    def check(alphas, betas, b_next):  # NumPy on the small T: no torch call per step
        m = len(alphas)
        theta, S = np.linalg.eigh(_tridiagonal_np(alphas, betas))
        idx = np.arange(m - 1, max(m - k, 0) - 1, -1)
        res = b_next * np.abs(S[-1, idx]) / np.maximum(np.abs(theta[idx]), 1e-30)
        state.update(theta=theta[idx], S=S[:, idx], res=res)
        if m < k:
            return False
        if (res <= tol).all():
            return True
        return value_tol is not None and m > k and bool(
            (_value_error(theta, res * np.abs(theta[idx]), k) <= value_tol).all())

    alphas, betas, basis = lanczos(matvec, v0, max_iter, on_step=check)
    S = torch.from_numpy(state["S"]).to(dtype=basis.Q.dtype, device=basis.Q.device)
    vectors = S.T @ basis.Q  # (k', P)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    res = torch.from_numpy(state["res"])
    return Eigen(values=torch.from_numpy(state["theta"]), vectors=vectors, residuals=res,
                 n_iter=len(alphas), converged=len(alphas) >= k and bool((res <= tol).all()))


def value_error(theta: Tensor, rho: Tensor, k: int) -> Tensor:
    """Estimated relative errors (k,) of the top-k Ritz values ``theta`` (all m, ascending) with
    absolute residual norms ``rho`` (k,, largest first): rho^2 / (gap |theta_i|), the gap being the
    distance from theta_i to the nearest other Ritz value (Kato-Temple / Parlett's gap bound
    |lambda - theta| <= rho^2 / gap, with the true gap replaced by the Ritz gap: an estimate, not
    a guarantee, while the neighbouring Ritz values are still moving)."""
    return torch.from_numpy(_value_error(np.asarray(theta, dtype=np.float64), np.asarray(rho, dtype=np.float64), k))


def _value_error(theta: np.ndarray, rho: np.ndarray, k: int) -> np.ndarray:
    m = len(theta)
    out = np.empty(k)
    for i in range(k):
        j = m - 1 - i
        others = np.delete(theta, j)
        gap = np.abs(others - theta[j]).min() if len(others) else np.inf
        out[i] = float(rho[i]) ** 2 / max(gap * abs(float(theta[j])), 1e-300)
    return out


def hutchinson_trace(matvec: MatVec, dim: int, rtol: float = 1e-2, max_samples: int = 1000,
                     min_samples: int = 10, deflate: int = 0, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32, device=None) -> TraceEstimate:
    """Estimate tr(C) = E[z^T C z] with Rademacher probes z; stop when ``stderr / |mean| < rtol``
    (after at least ``min_samples``) or after ``max_samples``.

    ``stderr`` is the sample standard deviation of the z^T C z over sqrt(n). ``deflate=m`` first runs
    m Lanczos steps from an independent random vector: with Q (m, P) the Krylov basis,
    tr(C) = tr(Q C Q^T) + tr((I - Q^T Q) C (I - Q^T Q)); the first term is the trace of the
    tridiagonal T (exact), the second is estimated with projected probes (I - Q^T Q) z. The estimate
    stays unbiased and its variance drops when C's Frobenius norm sits in its extreme eigenvalues.
    """
    exact, project, m = 0.0, None, 0
    if deflate > 0:
        v = gaussian(dim, generator, dtype, device)
        alphas, _, basis = lanczos(matvec, v, min(deflate, dim))
        exact, project, m = math.fsum(alphas), basis.orthogonalize, len(alphas)
    samples: list[float] = []
    mean = stderr = 0.0
    while len(samples) < max_samples:
        z = rademacher(dim, generator, dtype, device)
        if project is not None:
            z = project(z)
        samples.append(float(z @ matvec(z)))
        n = len(samples)
        s = torch.tensor(samples, dtype=torch.float64)
        mean = exact + float(s.mean())
        stderr = float(s.std() / math.sqrt(n)) if n > 1 else math.inf
        if n >= min_samples and stderr < rtol * abs(mean):
            break
    return TraceEstimate(mean=mean, stderr=stderr, n=len(samples),
                         n_matvec=len(samples) + (min(deflate, dim) if deflate > 0 else 0))


def lanczos_quadrature(matvec: MatVec, v: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Gauss quadrature of the spectral measure of C seen from ``v``: (nodes (m,), weights (m,)) with
    ``sum_i weights_i f(nodes_i) = v^T f(C) v / v^T v``, exact for polynomials f of degree <= 2m - 1."""
    alphas, betas, _ = lanczos(matvec, v, steps)
    theta, S = torch.linalg.eigh(_tridiagonal(alphas, betas))
    return theta, S[0].pow(2)


def spectral_density(matvec: MatVec, dim: int, n_probes: int = 4, steps: int = 64,
                     generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                     device=None) -> SpectralDensity:
    """Stochastic Lanczos quadrature: one :func:`lanczos_quadrature` per Rademacher probe.

    ``steps`` products per probe (fewer if C's Krylov space is smaller); in float64.
    """
    nodes = torch.zeros(n_probes, steps, dtype=torch.float64)
    weights = torch.zeros(n_probes, steps, dtype=torch.float64)
    for i in range(n_probes):
        th, w = lanczos_quadrature(matvec, rademacher(dim, generator, dtype, device), steps)
        nodes[i, :len(th)], weights[i, :len(w)] = th, w
    return SpectralDensity(nodes, weights)


def gaussian_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """sum_i w_i N(t; node_i, sigma^2) on ``grid`` (G,), averaged over probes (rows); integrates to 1
    when each row of ``weights`` sums to 1. ``nodes``, ``weights``: (n_probes, m) or (m,)."""
    nodes, weights = torch.atleast_2d(nodes), torch.atleast_2d(weights)
    t = grid.to(torch.float64)[:, None, None]  # (G, 1, 1)
    k = torch.exp(-0.5 * ((t - nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return (k * weights).sum(-1).mean(-1)
