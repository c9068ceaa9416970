"""Lanczos core against dense linear algebra on small explicit matrices."""

import numpy as np
import pytest
import torch

from trajscope.functional.lanczos import _tridiagonal, lanczos, top_eigenvalues, value_error


def spd(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.logspace(-3, 1, n, dtype=torch.float64)  # clustered small end: reorthogonalization matters
    return (Q * ev) @ Q.T, ev


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_basis_stays_orthonormal_and_t_is_the_projection(dtype, atol):
    n, steps = 50, 40
    A, _ = spd(n, 0)
    A = A.to(dtype)
    v0 = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=dtype)
    alphas, betas, basis = lanczos(lambda v: A @ v, v0, steps)
    Q = basis.Q.double()
    assert len(alphas) == steps and len(betas) == steps - 1
    assert torch.allclose(Q @ Q.T, torch.eye(steps, dtype=torch.float64), atol=10 * atol)
    T = _tridiagonal(alphas, betas)
    assert torch.allclose(Q @ A.double() @ Q.T, T, atol=100 * atol * float(A.abs().max()))


def test_top_k_match_eigvalsh_and_residuals_bound_the_error():
    n = 60
    A, ev = spd(n, 2)
    eig = top_eigenvalues(lambda v: A @ v, n, k=3, tol=1e-10, max_iter=n, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
    assert eig.converged
    assert torch.allclose(eig.values, ev.flip(0)[:3], rtol=1e-9)
    for i in range(3):  # the returned vectors are eigenvectors: |A y - theta y| / theta <= residual
        y = eig.vectors[i]
        r = float((A @ y - eig.values[i] * y).norm() / eig.values[i])
        assert r <= float(eig.residuals[i]) + 1e-10


def test_early_stop_is_a_ritz_value_below_lambda_max():
    n = 60
    A, ev = spd(n, 3)
    eig = top_eigenvalues(lambda v: A @ v, n, tol=1e-1, max_iter=n, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
    assert eig.n_iter < n and float(eig.residuals[0]) <= 1e-1
    assert float(eig.values[0]) <= float(ev[-1]) * (1 + 1e-12)
    # the residual bound: some eigenvalue lies within residual * theta
    assert float((ev - eig.values[0]).abs().min()) <= float(eig.residuals[0] * eig.values[0])


def test_value_error_takes_tensors_and_arrays_alike():
    theta, rho = [0.5, 1.0, 3.0], [0.2]
    expect = 0.04 / (2.0 * 3.0)
    assert float(value_error(torch.tensor(theta), torch.tensor(rho), 1)[0]) == pytest.approx(expect)
    assert float(value_error(np.array(theta), np.array(rho), 1)[0]) == pytest.approx(expect)
