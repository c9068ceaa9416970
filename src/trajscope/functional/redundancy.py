"""Directional redundancy of a trajectory: has its direction from the start stopped changing?

Singh et al. (2024) find that the directional structure of a trajectory saturates early and that
training only the normalization scales and shifts from then on matches training the whole network.
The online criterion built here measures that saturation on a recent window, scale-free:

- ``D_s = theta_s - theta_ref`` for the ``w`` most recent steps ``s`` (the window), ``theta_ref`` the
  state the watch started from (the init for a new run). Rows may be exact vectors or their count
  sketches (by linearity ``S theta_s - S theta_ref = S D_s``).
- ``mds``: the mean off-diagonal cosine of the window's ``D_s`` (MDS of the ``displacement``
  variant on the window; :func:`~trajscope.functional.gram.mds_from_vectors`).
- ``baseline``: the same quantity for an undirected random walk of the same age. For i.i.d.
  isotropic steps in high dimension ``cos(D_i, D_j) -> sqrt(min(i, j) / max(i, j))`` (i, j the ages
  ``s - ref``), so ``baseline = mean_{i != j} sqrt(min / max)`` over the window's ages
  (:func:`random_walk_mds`); a straight line has ``mds = 1``.
- ``ratio = (1 - mds) / (1 - baseline)``: how much the direction from the start still turns, as a
  fraction of what a random walk of that age would turn. ``0`` for a straight line, ``~1`` for a
  random walk (tested), and it falls as the trajectory saturates; the freeze controller calls the
  trajectory redundant when ``ratio <= threshold`` on ``patience`` consecutive decisions.
- ``update_cosine``: the mean cosine between consecutive updates ``D_{s+1} - D_s`` in the window,
  reported alongside (with momentum it stays high throughout training, so it is evidence, not the
  criterion).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from trajscope.functional.gram import mds_from_vectors

__all__ = ["random_walk_mds", "displacement_mds", "update_cosine", "redundancy"]


def random_walk_mds(first_age: int, width: int) -> float:
    """Mean of ``sqrt(min(i, j) / max(i, j))`` over ordered pairs ``i != j`` of the ages
    ``first_age .. first_age + width - 1`` (all >= 1): the high-dimensional limit of the windowed
    displacement MDS of an i.i.d. random walk. O(width^2) in float64."""
    if first_age < 1 or width < 2:
        raise ValueError(f"need first_age >= 1 and width >= 2, got {first_age}, {width}")
    a = torch.arange(first_age, first_age + width, dtype=torch.float64)
    M = torch.sqrt(torch.minimum(a[:, None], a[None, :]) / torch.maximum(a[:, None], a[None, :]))
    return float((M.sum() - width) / (width * (width - 1)))


def displacement_mds(window: Tensor, reference: Tensor) -> float:
    """MDS of the rows of ``window`` (w, d) minus ``reference`` (d,), in float64 (NaN if fewer than
    two rows differ from the reference)."""
    return mds_from_vectors(window.to(torch.float64) - reference.to(torch.float64))


def update_cosine(window: Tensor) -> float:
    """Mean cosine between consecutive differences of the rows of ``window`` (w, d), w >= 3 (zero
    updates are left out; NaN if fewer than two consecutive nonzero updates)."""
    U = torch.diff(window.to(torch.float64), dim=0)  # (w-1, d)
    n = torch.linalg.vector_norm(U, dim=1)
    ok = (n[1:] > 0) & (n[:-1] > 0)
    if not bool(ok.any()):
        return math.nan
    cos = (U[1:] * U[:-1]).sum(1) / (n[1:] * n[:-1]).clamp_min(torch.finfo(torch.float64).tiny)
    return float(cos[ok].mean())


def redundancy(window: Tensor, reference: Tensor, first_age: int) -> dict[str, float]:
    """``mds``, ``baseline``, ``ratio`` and ``update_cosine`` of a window (module docstring).

    ``window`` (w, d): theta (or its sketch) at w consecutive steps, the first ``first_age`` steps
    after the reference ``reference`` (d,).
    """
    w = window.shape[0]
    mds = displacement_mds(window, reference)
    base = random_walk_mds(first_age, w)
    ratio = (1.0 - mds) / (1.0 - base) if math.isfinite(mds) else math.nan
    return {"mds": mds, "baseline": base, "ratio": ratio,
            "update_cosine": update_cosine(window) if w >= 3 else math.nan}
