"""The vectors whose directions the trajectory map compares, in three variants, exact or sketched.

At the chosen points (steps) s_0 < s_1 < ... < s_{n-1} of a group's trajectory (default: every
snapshot step, or every sketch step when sketched), with theta_i the group's vector at s_i:

- ``theta``: theta_i itself, i = 0..n-1 (the map of Singh et al.; dominated by theta_0 early on).
- ``displacement``: theta_i - theta_0, i = 1..n-1 (theta_0 = the first point, the init).
- ``updates``: theta_{i+w} - theta_i, i = 0..n-1-w: the update over a window of ``w`` points (w=1:
  between consecutive points; with dense-early snapshots a point is a step early, a longer interval
  later).  Labelled by start step s_i and end step s_{i+w}.

Exact (``source="snapshots"``): Gram matrices streamed from the snapshots
(:func:`~trajscope.measures.streaming.snapshot_grams`), cached per group and steps in the
Trajectory.  Sketched (``source="sketches"``, group ``all`` only): the same linear combinations of
the sketch rows (a sketch is linear: S(a - b) = Sa - Sb), estimates with the error bounds of
:mod:`trajscope.functional.sketch`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from trajscope.errors import UsageError
from trajscope.functional.gram import (cosine_from_gram, gram, mean_offdiagonal, mds_from_vectors,
                                       norms_from_gram, window_mds_from_vectors, window_mean_offdiagonal,
                                       window_starts)
from trajscope.measures.groups import Group
from trajscope.measures.streaming import snapshot_grams
from trajscope.measures.trajectory import Trajectory

VARIANTS = ("theta", "displacement", "updates")


def default_window(m: int) -> tuple[int, int]:
    """(width, stride) of the sliding MDS windows over m vectors: about 100 windows, each a tenth
    of the points (at least 2), the width a multiple of the stride."""
    stride = max(1, m // 100)
    width = max(2, m // 10)
    width = min(m, -(-width // stride) * stride) if m >= 2 else 2
    return width, stride


@dataclass
class VariantData:
    """The m vectors of one variant: their Gram matrix (exact) or their rows (sketched)."""

    group: str
    variant: str
    window: int
    source: str
    start_steps: np.ndarray  # (m,)
    end_steps: np.ndarray  # (m,)
    gram: Tensor | None = None  # (m, m) float64, exact
    rows: Tensor | None = None  # (m, k) float32, sketched

    @property
    def m(self) -> int:
        return len(self.end_steps)

    def norms(self) -> np.ndarray:
        if self.gram is not None:
            return norms_from_gram(self.gram).cpu().numpy()
        return torch.linalg.vector_norm(self.rows.to(torch.float64), dim=1).numpy()

    def cosine(self, idx: np.ndarray | None = None) -> Tensor:
        """Cosine map (len(idx), len(idx)) float64 of the vectors ``idx`` (default all)."""
        if self.gram is not None:
            t = None if idx is None else torch.as_tensor(idx, device=self.gram.device)
            G = self.gram if t is None else self.gram[t][:, t]
        else:
            G = gram(self.rows if idx is None else self.rows[torch.as_tensor(idx)])
        return cosine_from_gram(G.cpu())

    def mds(self, diagonal: bool = False) -> float:
        if self.gram is not None:
            return mean_offdiagonal(self.cosine(), diagonal)
        return mds_from_vectors(self.rows, diagonal)

    def mds_window(self, width: int, stride: int, diagonal: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(start indices (w,), MDS of each window (w,)); windows of :func:`window_starts`."""
        starts = window_starts(self.m, width, stride)
        if self.gram is not None:
            vals = window_mean_offdiagonal(self.cosine(), width, stride, diagonal)
        else:
            vals = window_mds_from_vectors(self.rows, width, stride, diagonal)
        return starts, vals.numpy()


def exact_grams(traj: Trajectory, group: Group, steps: np.ndarray, windows=(), show: bool = False,
                **pass_options) -> dict:
    """The Gram matrices of :func:`snapshot_grams` ("ext" and ("updates", w) for ``windows``), cached
    in the trajectory per group and steps (the options of the pass that computed them win); the
    missing ones are computed in one pass."""
    key = ("grams", group, steps.tobytes())
    have = traj.cache.setdefault(key, {})
    want = [w for w in windows if 0 < w < len(steps) and ("updates", w) not in have]
    if "ext" not in have or want:
        have.update(snapshot_grams(traj, group, steps, want, ext="ext" not in have, show=show,
                                   **pass_options))
    return have


def theta_gram(ext: Tensor) -> Tensor:
    """Gram of theta_i from the Gram of [theta_0, D_1, ..., D_{n-1}] (D_i = theta_i - theta_0):
    <theta_i, theta_j> = |theta_0|^2 + <theta_0, D_i> + <theta_0, D_j> + <D_i, D_j> (no cancellation:
    every term is computed directly)."""
    c = ext[0].clone()
    c[0] = 0.0
    GD = displacement_gram(ext)
    return ext[0, 0] + c[:, None] + c[None, :] + GD


def displacement_gram(ext: Tensor) -> Tensor:
    """Gram (n, n) of D_i = theta_i - theta_0 for i = 0..n-1 (row and column 0 are zero)."""
    GD = ext.clone()
    GD[0, :] = 0.0
    GD[:, 0] = 0.0
    return GD


def variant_data(traj: Trajectory, group: Group, variant: str = "theta", window: int = 1,
                 exact: bool | None = None, steps=None, show: bool = False, **pass_options) -> VariantData:
    """The vectors of ``variant`` (module docstring) of ``group`` at ``steps``."""
    if variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r}; valid choices: {', '.join(VARIANTS)}")
    source = traj.source(group, exact)
    pts = traj.points(source, steps)
    n, w = len(pts), int(window)
    if variant == "updates" and not 1 <= w < n:
        raise UsageError(f"window {w} needs 1 <= window < {n} (the number of points)")
    if n < 2:
        raise UsageError(f"run {traj.id} has {n} recorded point(s) in its {source}; a trajectory needs 2")
    start, end = {"theta": (pts, pts), "displacement": (pts[1:], pts[1:]),
                  "updates": (pts[:n - w], pts[w:])}[variant]
    vd = VariantData(group.name, variant, w if variant == "updates" else 0, source, start, end)
    if source == "snapshots":
        grams = exact_grams(traj, group, pts, [w] if variant == "updates" else [], show, **pass_options)
        vd.gram = {"theta": lambda: theta_gram(grams["ext"]),
                   "displacement": lambda: displacement_gram(grams["ext"])[1:, 1:],
                   "updates": lambda: grams[("updates", w)]}[variant]()
    else:
        S = traj.sketches_at(pts)  # (n, k)
        vd.rows = {"theta": lambda: S, "displacement": lambda: S[1:] - S[0],
                   "updates": lambda: S[w:] - S[:n - w]}[variant]()
    return vd


def sketch_bounds(traj: Trajectory, delta: float = 0.1) -> dict:
    """The sketch's stated error bounds at confidence 1 - delta, per estimated quantity."""
    from trajscope.functional.sketch import cosine_error_bound, norm_error_bound

    k = traj.sketch_k
    return {"sketch_k": k, "delta": delta, "cosine_error_bound": cosine_error_bound(k, delta),
            "norm_error_bound": norm_error_bound(k, delta), "cosine_error_std": 1.0 / math.sqrt(k)}
