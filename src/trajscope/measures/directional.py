"""Directional structure of a trajectory (Singh et al. 2024): trajectory maps and MDS.

Variants (one name each, used for the function argument, the stored result and the summary key;
definitions in :mod:`trajscope.measures.vectors`): ``theta`` (the paper's map of theta_t),
``displacement`` (theta_t - theta_0) and ``updates`` (theta_{t+w} - theta_t over a window of w points).

- :func:`trajectory_map` -> :class:`TrajectoryMap`: the cosine map C[i, j] between the variant's
  vectors, stored as ``trajectory_map.<variant>:<group>``.
- :func:`mds` -> :class:`MDSResult`: the mean directional similarity, the mean of C[i, j] over
  ordered pairs i != j of nonzero vectors (``mds``; ``mds_with_diagonal`` averages over all pairs),
  over the whole run and over sliding windows of ``width`` consecutive points moved by ``stride``
  points (``mds_window``).  Windows count *points* (snapshots when exact, sketched steps when
  sketched), not steps: with dense-early snapshots an early window spans few steps and a late one
  many; each window reports the step where it starts and ends, so that MDS can be plotted against
  steps.  Stored as ``mds.<variant>:<group>``.

Summary keys of ``trajscope analyze`` per group: ``mds`` (theta), ``mds_displacement``,
``mds_updates``, and the window series ``mds_window`` (theta), ``mds_window_displacement``,
``mds_window_updates``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd

from trajscope.measures.groups import Group
from trajscope.measures.results import Result
from trajscope.measures.trajectory import Trajectory
from trajscope.measures.vectors import default_window, sketch_bounds, variant_data


def log_subsample(m: int, max_points: int) -> np.ndarray:
    """At most ``max_points`` indices in [0, m), log-spaced (dense early, like the snapshot
    schedule), always with 0 and m - 1; all of them if m <= max_points."""
    if m <= max_points:
        return np.arange(m)
    idx = np.unique(np.round(np.geomspace(1, m, max_points)).astype(np.int64) - 1)
    return np.union1d(idx, [0, m - 1])


@dataclass
class TrajectoryMap(Result):
    """Cosine map ``cosine`` (m, m) between the vectors of ``variant`` of ``group``.

    Vector i is taken at ``end_steps[i]`` (for ``updates`` it is the update from ``start_steps[i]``
    to ``end_steps[i]``; otherwise start = end).  ``norms`` (m,) are their L2 norms.  NaN rows are
    zero vectors.  ``source``: ``snapshots`` (exact) or ``sketches`` (estimates; ``sketch`` holds the
    stated error bounds).  ``subsampled``: the map is at a log-spaced subset of the points.
    """

    kind: ClassVar[str] = "trajectory_map"
    group: str
    variant: str
    window: int
    source: str
    start_steps: np.ndarray
    end_steps: np.ndarray
    cosine: np.ndarray
    norms: np.ndarray
    subsampled: bool = False
    sketch: dict | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.variant}:{self.group}"

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (i, j) with start/end steps of both vectors and the cosine."""
        m = len(self.end_steps)
        i, j = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
        i, j = i.ravel(), j.ravel()
        return pd.DataFrame({"start_step_i": self.start_steps[i], "step_i": self.end_steps[i],
                             "start_step_j": self.start_steps[j], "step_j": self.end_steps[j],
                             "cosine": self.cosine.ravel()})


@dataclass
class MDSResult(Result):
    """Mean directional similarity of ``variant`` of ``group`` over ``n_points`` vectors, and over
    sliding windows (module docstring): window k covers the vectors of steps ``window_start_step[k]``
    to ``window_end_step[k]`` and has MDS ``mds_window[k]``."""

    kind: ClassVar[str] = "mds"
    group: str
    variant: str
    window: int
    source: str
    mds: float
    mds_with_diagonal: float
    n_points: int
    width: int
    stride: int
    window_start_step: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    window_end_step: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mds_window: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sketch: dict | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.variant}:{self.group}"

    def to_frame(self) -> pd.DataFrame:
        """One row per window: start_step, end_step, mds_window."""
        return pd.DataFrame({"start_step": self.window_start_step, "end_step": self.window_end_step,
                             "mds_window": self.mds_window})

    def window_series(self) -> dict:
        """The window series as plain lists (the ``mds_window`` summary object)."""
        return {"start_step": self.window_start_step.tolist(), "end_step": self.window_end_step.tolist(),
                "mds_window": self.mds_window.tolist(), "width": self.width, "stride": self.stride}


def trajectory_map(traj: Trajectory, group: Group | str = "all", variant: str = "theta", window: int = 1,
                   exact: bool | None = None, steps=None, max_points: int = 2048, show: bool = False,
                   **pass_options) -> TrajectoryMap:
    """The trajectory map of ``variant`` (exact from snapshots, or from sketches for group ``all``).

    ``steps``: the points (default: every snapshot step, or every sketch step when sketched).  More
    than ``max_points`` vectors give the map at a log-spaced subset (:func:`log_subsample`); MDS is
    always over all of them (:func:`mds`).  ``pass_options`` go to the exact Gram pass
    (``budget_bytes``, ``block``, ``dtype``, ``device``).
    """
    g = traj.group(group)
    vd = variant_data(traj, g, variant, window, exact, steps, show, **pass_options)
    idx = log_subsample(vd.m, max_points)
    return TrajectoryMap(g.name, variant, vd.window, vd.source, vd.start_steps[idx], vd.end_steps[idx],
                         vd.cosine(idx).numpy(), vd.norms()[idx], subsampled=len(idx) < vd.m,
                         sketch=sketch_bounds(traj) if vd.source == "sketches" else None)


def mds(traj: Trajectory, group: Group | str = "all", variant: str = "theta", window: int = 1,
        exact: bool | None = None, steps=None, width: int | None = None, stride: int | None = None,
        show: bool = False, **pass_options) -> MDSResult:
    """MDS of ``variant`` over all points and over sliding windows (default :func:`default_window`:
    about 100 windows of a tenth of the points)."""
    g = traj.group(group)
    vd = variant_data(traj, g, variant, window, exact, steps, show, **pass_options)
    dw, ds = default_window(vd.m)
    width, stride = int(width or dw), int(stride or ds)
    starts, vals = vd.mds_window(width, stride)
    return MDSResult(g.name, variant, vd.window, vd.source, vd.mds(), vd.mds(diagonal=True), vd.m,
                     width, stride, vd.start_steps[starts], vd.end_steps[starts + width - 1], vals,
                     sketch=sketch_bounds(traj) if vd.source == "sketches" else None)
