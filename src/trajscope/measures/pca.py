"""Low-dimensional structure of a trajectory: PCA of its points.

The points are the group's vectors at the chosen steps (default: every snapshot step when exact,
every sketch step when sketched), each weighing the same, centered at their mean (so the dense
early snapshots weigh more than the log-spaced late ones: the spectrum depends on the points
chosen).  Exact PCA diagonalizes the centered Gram matrix of the displacements theta_i - theta_0
(the same PCA as of theta_i, and free of the cancellation of |theta| >> spread); sketched PCA
diagonalizes the covariance of the sketch rows.  Definitions (:mod:`trajscope.functional.pca`):

- ``explained_variance_ratio``: lam_j / sum(lam), all components, largest first;
- ``components_90`` / ``components_99``: the fewest components explaining >= 90% / 99%;
- ``effective_dim``: the participation ratio (sum lam)^2 / sum lam^2;
- ``coords``: the coordinates of steps in the top ``n_components`` axes (axis signs: the last point
  is positive).  Exact at the PCA's points; when the run's sketches are of the same vector (group
  ``all`` with complete snapshots), every other sketched step is projected on the axes through its
  sketch (``coord_from_sketch`` = 1), an estimate whose error at the snapshot steps is reported as
  ``sketch_coord_error`` (RMS error over points and axes, in units of the top axis's std).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from trajscope.functional.pca import (components_for, explained_variance_ratio, gram_pca,
                                      participation_ratio, vectors_pca)
from trajscope.measures.groups import Group
from trajscope.measures.results import Result
from trajscope.measures.trajectory import Trajectory
from trajscope.measures.vectors import displacement_gram, exact_grams, sketch_bounds


@dataclass
class TrajectoryPCA(Result):
    """PCA of ``group``'s trajectory at the points ``steps`` (module docstring).  ``variance`` is
    lam / n (per point); ``weights`` (n, r): axis j = sum_i weights[i, j] theta_{steps[i]}."""

    kind: ClassVar[str] = "pca"
    group: str
    source: str
    steps: np.ndarray
    explained_variance_ratio: np.ndarray
    variance: np.ndarray
    components_90: int
    components_99: int
    effective_dim: float
    coord_steps: np.ndarray
    coords: np.ndarray
    coord_from_sketch: np.ndarray
    weights: np.ndarray
    sketch_coord_error: float = math.nan
    sketch: dict | None = None

    def to_frame(self) -> pd.DataFrame:
        """One row per step: pc1..pcr and whether the coordinates come from the sketch."""
        cols = {"step": self.coord_steps}
        cols.update({f"pc{j + 1}": self.coords[:, j] for j in range(self.coords.shape[1])})
        cols["from_sketch"] = self.coord_from_sketch.astype(bool)
        return pd.DataFrame(cols)


def _sketch_coords(traj: Trajectory, pts: np.ndarray, weights: Tensor, chunk: int = 8192) -> Tensor:
    """Coordinates (T, r) of every sketch step in the axes sum_i weights[i] theta_{pts[i]}, from sketches.

    <theta_t - mean, v_j> with v_j = sum_i w_ij theta_i (sum_i w_ij = 0) is estimated by the same
    combination of sketches: (S_t - S_0 - mean_i(S_i - S_0)) . sum_i w_ij (S_i - S_0)."""
    Sp = traj.sketches_at(pts).to(torch.float64)  # (n, k)
    Z = Sp - Sp[0]
    VS = Z.T @ weights  # (k, r): sketched axes
    shift = Sp[0] + Z.mean(0)
    S = traj.sketch_matrix
    return torch.cat([(S[a:a + chunk].to(torch.float64) - shift) @ VS for a in range(0, len(S), chunk)])


def trajectory_pca(traj: Trajectory, group: Group | str = "all", exact: bool | None = None, steps=None,
                   n_components: int = 10, show: bool = False, **pass_options) -> TrajectoryPCA:
    """:class:`TrajectoryPCA` of ``group`` (exact from snapshots, or from sketches for ``all``)."""
    g = traj.group(group)
    source = traj.source(g, exact)
    pts = traj.points(source, steps)
    if len(pts) < 2:
        from trajscope.errors import UsageError

        raise UsageError(f"run {traj.id} has {len(pts)} recorded point(s); PCA needs 2")
    if source == "snapshots":
        pca = gram_pca(displacement_gram(exact_grams(traj, g, pts, (), show, **pass_options)["ext"]).cpu(),
                       n_components)
    else:
        pca = vectors_pca(traj.sketches_at(pts), n_components)
    lam = pca.eigenvalues
    coord_steps, coords = pts, pca.coords
    from_sketch = np.zeros(len(pts), dtype=np.int8)
    err = math.nan
    if source == "snapshots" and np.isin(pts, traj.sketch_steps).all() and traj.sketch_covers(g):
        sk = _sketch_coords(traj, pts, pca.weights)  # (T, r)
        at = np.searchsorted(traj.sketch_steps, pts)
        if float(lam[0]) > 0:
            err = float((sk[at] - coords).pow(2).mean().sqrt() / math.sqrt(float(lam[0]) / len(pts)))
        coord_steps = np.union1d(pts, traj.sketch_steps)
        coords_all = torch.empty(len(coord_steps), coords.shape[1], dtype=torch.float64)
        coords_all[torch.as_tensor(np.searchsorted(coord_steps, traj.sketch_steps))] = sk
        coords_all[torch.as_tensor(np.searchsorted(coord_steps, pts))] = coords
        coords = coords_all
        from_sketch = (~np.isin(coord_steps, pts)).astype(np.int8)
    return TrajectoryPCA(
        g.name, source, pts, explained_variance_ratio(lam).numpy(), (lam / len(pts)).numpy(),
        components_for(lam, 0.90), components_for(lam, 0.99), participation_ratio(lam),
        coord_steps, coords.numpy(), from_sketch, pca.weights.numpy(), err,
        sketch=sketch_bounds(traj) if source == "sketches" or from_sketch.any() else None)


def pca_directions(traj: Trajectory, pca: TrajectoryPCA, group: Group | str | None = None,
                   n: int = 2) -> list[dict[str, Tensor]]:
    """The top ``n`` exact principal axes as named tensors (unit vectors in the group's parameter
    space, shaped like the parameters), e.g. to draw the loss landscape around the trajectory.
    ``group``: the PCA's group (default: parsed from ``pca.group``; pass the Group for presets).
    Streams the snapshots once; needs a PCA computed from snapshots."""
    traj.require_snapshots("pca_directions")
    if pca.source != "snapshots":
        raise ValueError("pca_directions needs a PCA computed from snapshots (exact=True)")
    g = traj.group(group if group is not None else pca.group)
    W = torch.from_numpy(pca.weights[:, :n])  # (n_points, n)
    acc = torch.zeros(traj.numel(g), W.shape[1], dtype=torch.float64)  # (P_g, n)
    for i, (_, vecs) in enumerate(traj.vectors(pca.steps, [g], dtype=torch.float64)):
        acc.addmm_(vecs[g.name][:, None], W[i:i + 1])
    dirs, off = [{} for _ in range(W.shape[1])], 0
    for name in g.tensors:
        shape = traj.shapes[name]
        size = int(np.prod(shape, dtype=np.int64))
        for j, d in enumerate(dirs):
            d[name] = acc[off:off + size, j].reshape(shape).to(torch.float32)
        off += size
    return dirs
