"""Gram and cosine matrices of many long vectors, and the mean directional similarity (MDS).

Rows of ``X`` (n, d) are vectors (parameter vectors, their differences, or their sketches).  The
Gram matrix ``G = X X^T`` is accumulated block by block with ``torch.mm`` in the dtype of ``X``
(float32 for snapshots) and summed across column chunks in **float64**, so that only one chunk of
``chunk`` columns is multiplied at a time and the rounding error grows with ``chunk``, not with d.

MDS (mean directional similarity, Singh et al. 2024) of n vectors is the mean of the cosine map
``C[i, j] = <x_i, x_j> / (|x_i| |x_j|)`` over the ordered pairs ``i != j`` (``diagonal=True``: over
all pairs, the diagonal ones being 1).  A zero vector has no direction: its row and column of ``C``
are NaN and it is left out of every mean (so MDS is over the nonzero vectors only).  Two ways to get
it, equal up to rounding (tested): from a cosine map (:func:`mean_offdiagonal`) and, without the
O(n^2) map, from the vectors themselves (:func:`mds_from_vectors`), by

    sum_{i != j} cos(x_i, x_j) = |sum_i u_i|^2 - m,   u_i = x_i / |x_i|,  m = number of nonzero x_i.

A window is ``width`` consecutive vectors (indices ``a .. a+width-1``); windows start at
``0, stride, 2*stride, ...`` and the last one always ends at the last vector (:func:`window_starts`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["gram", "gram_accumulate_", "cosine_from_gram", "mean_offdiagonal", "window_starts",
           "window_mean_offdiagonal", "mds_from_vectors", "window_mds_from_vectors", "norms_from_gram"]


def gram_accumulate_(G: Tensor, X: Tensor, Y: Tensor | None = None, block: int = 512) -> Tensor:
    """``G += X @ Y.T`` in place, in blocks of ``block`` rows; returns G.

    X (m, c), Y (n, c) in one dtype (the product's); G (m, n) usually float64 (the accumulator).
    ``Y=None`` means ``Y = X``: only the blocks on and above the diagonal are multiplied (about half
    the FLOPs) and mirrored.  Each block is one ``torch.mm`` of shape (block, c) x (c, block).
    """
    sym = Y is None
    Y = X if sym else Y
    m, n = X.shape[0], Y.shape[0]
    for a in range(0, m, block):
        Xa = X[a:a + block]  # (Ba, c)
        for b in range(a if sym else 0, n, block):
            blk = torch.mm(Xa, Y[b:b + block].T)  # (Ba, Bb) in X.dtype
            G[a:a + blk.shape[0], b:b + blk.shape[1]] += blk
            if sym and b != a:
                G[b:b + blk.shape[1], a:a + blk.shape[0]] += blk.T
    return G


def gram(X: Tensor, Y: Tensor | None = None, *, chunk: int = 1 << 16, block: int = 512,
         dtype: torch.dtype | None = None) -> Tensor:
    """Gram matrix ``X Y^T`` (``Y=None``: ``X X^T``) as float64; X (m, d), Y (n, d) -> (m, n).

    Products in ``dtype`` (default: X's floating dtype) over column chunks of ``chunk``, summed in
    float64 (see module docstring).  Memory beyond the inputs: one (m, n) float64 matrix plus one
    (block, block) product.
    """
    dtype = dtype or (X.dtype if X.is_floating_point() else torch.float32)
    m = X.shape[0]
    n = m if Y is None else Y.shape[0]
    G = torch.zeros(m, n, dtype=torch.float64, device=X.device)
    for c in range(0, max(X.shape[1], 1), chunk):
        Xc = X[:, c:c + chunk].to(dtype)
        Yc = None if Y is None else Y[:, c:c + chunk].to(dtype)
        gram_accumulate_(G, Xc, Yc, block)
    return G


def norms_from_gram(G: Tensor) -> Tensor:
    """|x_i| = sqrt(G[i, i]) (negative rounding residue clipped to 0); (n, n) -> (n,)."""
    return torch.diagonal(G).clamp_min(0).sqrt()


def cosine_from_gram(G: Tensor) -> Tensor:
    """Cosine map ``C[i, j] = G[i, j] / (|x_i| |x_j|)`` clamped to [-1, 1]; (n, n) -> (n, n).

    Rows and columns of zero vectors are NaN (no direction); the diagonal of the others is 1.
    """
    nrm = norms_from_gram(G)
    C = (G / (nrm[:, None] * nrm[None, :])).clamp(-1.0, 1.0)
    zero = nrm == 0
    C[zero, :] = math.nan
    C[:, zero] = math.nan
    idx = torch.arange(G.shape[0], device=G.device)
    C[idx[~zero], idx[~zero]] = 1.0
    return C


def mean_offdiagonal(C: Tensor, diagonal: bool = False) -> float:
    """MDS of a cosine map: mean of the finite ``C[i, j]``, i != j (``diagonal``: all i, j).

    NaN if fewer than two vectors are nonzero (fewer than one with ``diagonal``)."""
    C = C.to(torch.float64)
    ok = torch.isfinite(C)
    if not diagonal:
        ok &= ~torch.eye(C.shape[0], dtype=torch.bool, device=C.device)
    count = int(ok.sum())
    return float(C[ok].sum() / count) if count else math.nan


def window_starts(n: int, width: int, stride: int = 1) -> np.ndarray:
    """Start indices of the windows ``[a, a + width)`` over n points: 0, stride, ...; the last
    window always ends at n - 1 (it is added if the stride skips it).  Empty if width > n."""
    if width < 1 or stride < 1:
        raise ValueError(f"width and stride must be >= 1, got {width}, {stride}")
    if width > n:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(0, n - width + 1, stride, dtype=np.int64)
    if starts[-1] != n - width:
        starts = np.append(starts, n - width)
    return starts


def window_mean_offdiagonal(C: Tensor, width: int, stride: int = 1, diagonal: bool = False) -> Tensor:
    """MDS of each window's sub-map ``C[a:a+width, a:a+width]`` (:func:`window_starts`); (n_windows,).

    O(n^2) via summed-area tables of C (NaN taken as 0) and of the count of finite entries.
    """
    C = C.to(torch.float64)
    ok = torch.isfinite(C)
    V = torch.where(ok, C, torch.zeros((), dtype=C.dtype, device=C.device))
    # S[i, j] = sum of V[:i, :j]; (n+1, n+1)
    S = torch.nn.functional.pad(V.cumsum(0).cumsum(1), (1, 0, 1, 0))
    K = torch.nn.functional.pad(ok.to(torch.float64).cumsum(0).cumsum(1), (1, 0, 1, 0))
    d_ok = torch.diagonal(ok).to(torch.float64)
    d_val = torch.diagonal(V)
    dS = torch.nn.functional.pad(d_val.cumsum(0), (1, 0))
    dK = torch.nn.functional.pad(d_ok.cumsum(0), (1, 0))
    a = torch.as_tensor(window_starts(C.shape[0], width, stride), device=C.device)
    b = a + width
    total = S[b, b] - S[a, b] - S[b, a] + S[a, a]
    count = K[b, b] - K[a, b] - K[b, a] + K[a, a]
    if not diagonal:
        total, count = total - (dS[b] - dS[a]), count - (dK[b] - dK[a])
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def _units(X: Tensor) -> tuple[Tensor, Tensor]:
    """(unit rows in X's float dtype, zero rows left 0 (n, d); nonzero mask (n,)); sums of them
    are then taken in float64."""
    X = X if X.is_floating_point() else X.to(torch.float64)
    nrm = torch.linalg.vector_norm(X, dim=1, dtype=torch.float64).to(X.dtype)
    ok = nrm > 0
    return X / torch.where(ok, nrm, torch.ones_like(nrm))[:, None], ok


def _mds_from_sum(s2: Tensor, m: Tensor, diagonal: bool) -> Tensor:
    """MDS from |sum u|^2 and the count m of nonzero vectors (elementwise over windows)."""
    m = m.to(torch.float64)
    if diagonal:
        return torch.where(m > 0, s2 / (m * m).clamp_min(1), torch.full_like(s2, math.nan))
    return torch.where(m > 1, (s2 - m) / (m * (m - 1)).clamp_min(1), torch.full_like(s2, math.nan))


def mds_from_vectors(X: Tensor, diagonal: bool = False) -> float:
    """MDS of the rows of X (n, d) without the n x n map: O(n d) (module docstring)."""
    U, ok = _units(X)
    s = U.sum(0, dtype=torch.float64)
    return float(_mds_from_sum((s * s).sum(), ok.sum(), diagonal))


def window_mds_from_vectors(X: Tensor, width: int, stride: int = 1, diagonal: bool = False) -> Tensor:
    """Windowed MDS of the rows of X (n, d) (windows of :func:`window_starts`); (n_windows,).

    Sums of unit vectors over blocks of ``g = gcd(width, stride)`` rows, then prefix sums over the
    blocks in float64: O(n d) time and (n / g) x d memory.  The last (added) window is summed directly.
    """
    n = X.shape[0]
    starts = window_starts(n, width, stride)
    if len(starts) == 0:
        return torch.zeros(0, dtype=torch.float64)
    U, ok = _units(X)
    g = math.gcd(width, stride)
    nb = n // g
    B = U[:nb * g].reshape(nb, g, -1).sum(1, dtype=torch.float64)  # (nb, d) block sums
    P = torch.nn.functional.pad(B.cumsum(0), (0, 0, 1, 0))  # (nb+1, d)
    cnt = torch.nn.functional.pad(ok[:nb * g].reshape(nb, g).sum(1).cumsum(0), (1, 0))
    a = torch.as_tensor(starts)
    on = a % g == 0  # every window but possibly the added last one
    lo, hi = a[on] // g, (a[on] + width) // g
    S = P[hi] - P[lo]  # (w, d)
    s2 = torch.empty(len(a), dtype=torch.float64)
    m = torch.empty(len(a), dtype=torch.int64)
    s2[on], m[on] = (S * S).sum(1), cnt[hi] - cnt[lo]
    if not bool(on.all()):  # the added last window, off the block grid: summed directly
        last = int(a[-1])
        s = U[last:last + width].sum(0, dtype=torch.float64)
        s2[-1], m[-1] = (s * s).sum(), ok[last:last + width].sum()
    return _mds_from_sum(s2, m, diagonal)
