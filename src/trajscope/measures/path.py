"""The path of a trajectory through its points: distances from init, successive updates, straightness.

At points s_0 < ... < s_{n-1} (default: every snapshot step when exact, every sketch step when
sketched), with x_i the group's vector at s_i and u_i = x_i - x_{i-1} the update between points:

- ``norm`` |x_i|; ``distance_from_init`` |x_i - x_0| (L2); ``relative_distance_from_init``
  |x_i - x_0| / |x_0|; ``cosine_to_init`` cos(x_i, x_0);
- ``update_norm`` |u_i| (NaN at i = 0); ``update_cosine`` cos(u_i, u_{i-1}), the cosine between
  successive updates (NaN for i < 2 or a zero update);
- ``path_length`` sum_{j <= i} |u_j|, the length of the polygon through the points (a lower bound
  of the length of the per-step path when points are further apart than one step);
- ``straightness`` |x_i - x_0| / path_length_i, displacement over path length (1 for a straight,
  monotone path; NaN at i = 0).

Exact values come from one ordered pass over the snapshots (float64); sketched ones from the sketch
rows (group ``all`` only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd

from trajscope.measures.groups import Group
from trajscope.measures.results import Result
from trajscope.measures.streaming import streamed_statistics, vector_statistics
from trajscope.measures.trajectory import Trajectory

COLUMNS = ("norm", "distance_from_init", "relative_distance_from_init", "cosine_to_init",
           "update_norm", "update_cosine", "path_length", "straightness")


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def derive(prim: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The columns of :data:`COLUMNS` from the primitives of
    :func:`~trajscope.measures.streaming.streamed_statistics` (norm, dot0, dist0, update_norm, update_dot)."""
    norm, un = prim["norm"], prim["update_norm"]
    prev_un = np.concatenate([[np.nan], un[:-1]])
    steps_len = np.nan_to_num(un, nan=0.0)
    path = np.cumsum(steps_len)
    straight = _div(prim["dist0"], path)
    straight[:1] = np.nan
    return {"norm": norm, "distance_from_init": prim["dist0"],
            "relative_distance_from_init": prim["dist0"] / norm[0] if norm[0] > 0 else np.full_like(norm, np.nan),
            "cosine_to_init": np.clip(_div(prim["dot0"], norm * norm[0]), -1.0, 1.0),
            "update_norm": un, "update_cosine": np.clip(_div(prim["update_dot"], un * prev_un), -1.0, 1.0),
            "path_length": path, "straightness": straight}


def exact_statistics(traj: Trajectory, groups: Sequence[Group], steps: np.ndarray, weights: bool,
                     show: bool = False) -> dict[str, dict]:
    """:func:`streamed_statistics` per group, cached in the trajectory; one pass for the missing groups."""
    key = lambda g: ("stats", g, steps.tobytes())  # noqa: E731
    missing = [g for g in groups if key(g) not in traj.cache or (weights and not traj.cache[key(g)][0])]
    if missing:
        for name, st in streamed_statistics(traj, missing, steps, weights=weights, show=show).items():
            g = next(g for g in missing if g.name == name)
            traj.cache[key(g)] = (weights, st)
    return {g.name: traj.cache[key(g)][1] for g in groups}


@dataclass
class PathStatistics(Result):
    """Per point of ``group``'s trajectory: the columns of the module docstring, at ``step`` (n,)."""

    kind: ClassVar[str] = "path_statistics"
    group: str
    source: str
    step: np.ndarray
    norm: np.ndarray
    distance_from_init: np.ndarray
    relative_distance_from_init: np.ndarray
    cosine_to_init: np.ndarray
    update_norm: np.ndarray
    update_cosine: np.ndarray
    path_length: np.ndarray
    straightness: np.ndarray
    sketch: dict | None = None

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"step": self.step, **{c: getattr(self, c) for c in COLUMNS}})

    @property
    def straightness_final(self) -> float:
        """Straightness of the whole recorded path (displacement over path length at the last point)."""
        return float(self.straightness[-1]) if len(self.step) > 1 else float("nan")

    @property
    def update_cosine_mean(self) -> float:
        """Mean of the finite successive-update cosines (NaN if none)."""
        ok = np.isfinite(self.update_cosine)
        return float(self.update_cosine[ok].mean()) if ok.any() else float("nan")


def path_statistics(traj: Trajectory, group: Group | str = "all", exact: bool | None = None, steps=None,
                    show: bool = False) -> PathStatistics:
    """:class:`PathStatistics` of ``group`` (exact from snapshots, or from sketches for ``all``)."""
    from trajscope.measures.vectors import sketch_bounds

    g = traj.group(group)
    source = traj.source(g, exact)
    pts = traj.points(source, steps)
    if source == "snapshots":
        prim = exact_statistics(traj, [g], pts, weights=False, show=show)[g.name]
    else:
        prim = vector_statistics(traj.sketches_at(pts))
    cols = derive(prim)
    return PathStatistics(g.name, source, pts, **cols,
                          sketch=sketch_bounds(traj) if source == "sketches" else None)
