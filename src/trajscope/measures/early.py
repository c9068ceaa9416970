"""Early-phase weight statistics per group and snapshot step (Frankle, Schwab, Morcos 2020).

For the group's weights w (all elements of its tensors pooled) at each snapshot step, against the
init w_0 (the first snapshot):

- ``distance_from_init`` |w - w_0| (L2), ``relative_distance_from_init`` |w - w_0| / |w_0|,
  ``cosine_to_init`` cos(w, w_0), ``norm`` |w| (same definitions as in
  :mod:`trajscope.measures.path`);
- ``sign_flip_fraction``: the fraction of the group's weights whose sign is opposite to their sign
  at init (sign(w) * sign(w_0) < 0; a weight that is exactly 0 at either step does not count as
  flipped; the denominator is every weight of the group);
- ``abs_q<P>``: the P-th percentile of |w| over the group's weights (linear interpolation), for each
  of ``quantiles`` (default 10, 25, 50, 75, 90);
- ``kurtosis``: the excess kurtosis of w, m4 / m2^2 - 3 with central moments over the group's
  weights (0 for a Gaussian, -1.2 for a uniform);
- ``grad_norm``: |g|, the L2 norm of the gradient recorded with that step (the one the optimizer
  step to it used, computed at the previous parameters), from ``grads`` snapshots restricted to the
  group, else for the group ``all`` the recorder's ``grad_norm`` scalar (over every parameter of the
  model); NaN where not recorded (e.g. at step 0).

Exact only: these need the snapshots (a run with only sketches raises NeedsSnapshotsError; the
inner-product columns are available from sketches through :func:`~trajscope.measures.path_statistics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd

from trajscope.measures.groups import Group
from trajscope.measures.path import derive, exact_statistics
from trajscope.measures.results import Result
from trajscope.measures.streaming import QUANTILES
from trajscope.measures.trajectory import Trajectory


def quantile_column(q: float) -> str:
    """``abs_q10`` for q = 0.1 (``abs_q2.5`` for 0.025)."""
    return f"abs_q{100 * q:g}"


@dataclass
class EarlyStatistics(Result):
    """Per snapshot step of ``group``: the statistics of the module docstring."""

    kind: ClassVar[str] = "early_statistics"
    group: str
    step: np.ndarray
    norm: np.ndarray
    distance_from_init: np.ndarray
    relative_distance_from_init: np.ndarray
    cosine_to_init: np.ndarray
    sign_flip_fraction: np.ndarray
    kurtosis: np.ndarray
    grad_norm: np.ndarray
    abs_quantiles: np.ndarray  # (n, len(quantiles))
    quantiles: list = field(default_factory=lambda: list(QUANTILES))

    def to_frame(self) -> pd.DataFrame:
        cols = {"step": self.step, "group": self.group}
        for c in ("norm", "distance_from_init", "relative_distance_from_init", "cosine_to_init",
                  "sign_flip_fraction", "kurtosis", "grad_norm"):
            cols[c] = getattr(self, c)
        for k, q in enumerate(self.quantiles):
            cols[quantile_column(q)] = self.abs_quantiles[:, k]
        return pd.DataFrame(cols)

    def final(self, column: str) -> float:
        """The value of ``column`` at the last step (NaN if there is none)."""
        values = getattr(self, column)
        return float(values[-1]) if len(values) else float("nan")


def early_statistics(traj: Trajectory, group: Group | str = "all", steps=None,
                     show: bool = False) -> EarlyStatistics:
    """:class:`EarlyStatistics` of ``group`` at ``steps`` (default every snapshot step)."""
    return early_statistics_many(traj, [group], steps, show)[0]


def early_statistics_many(traj: Trajectory, groups: Sequence[Group | str], steps=None,
                          show: bool = False) -> list[EarlyStatistics]:
    """:func:`early_statistics` of several groups from one pass over the snapshots."""
    traj.require_snapshots("early_statistics (sign flips, weight quantiles, kurtosis)")
    gs = [traj.group(g) for g in groups]
    pts = traj.points("snapshots", steps)
    stats = exact_statistics(traj, gs, pts, weights=True, show=show)
    out = []
    for g in gs:
        st = stats[g.name]
        d = derive(st)
        out.append(EarlyStatistics(g.name, pts, d["norm"], d["distance_from_init"],
                                   d["relative_distance_from_init"], d["cosine_to_init"],
                                   st["sign_flip_fraction"], st["kurtosis"], st["grad_norm"],
                                   st["abs_quantiles"], list(QUANTILES)))
    return out
