"""Trajectory-level analysis of a stored run: directional maps and MDS, path and early-phase
statistics, PCA; per group of parameters; exact from snapshots or estimated from sketches.

>>> from trajscope import measures
>>> traj = measures.Trajectory.open("my-run", root="runs")                 # doctest: +SKIP
>>> measures.mds(traj, "all", variant="updates").mds                        # doctest: +SKIP
>>> measures.analyze("my-run", root="runs", groups=["all", "layers"])      # doctest: +SKIP
"""

from trajscope.measures.analyze import analyze, summary_lines
from trajscope.measures.directional import MDSResult, TrajectoryMap, mds, trajectory_map
from trajscope.measures.early import EarlyStatistics, early_statistics, early_statistics_many
from trajscope.measures.groups import GROUP_HELP, Group, parse_groups
from trajscope.measures.path import PathStatistics, path_statistics
from trajscope.measures.pca import TrajectoryPCA, pca_directions, trajectory_pca
from trajscope.measures.trajectory import NeedsSnapshotsError, Trajectory
from trajscope.measures.vectors import VARIANTS, variant_data

__all__ = ["GROUP_HELP", "VARIANTS", "EarlyStatistics", "Group", "MDSResult", "NeedsSnapshotsError",
           "PathStatistics", "Trajectory", "TrajectoryMap", "TrajectoryPCA", "analyze",
           "early_statistics", "early_statistics_many", "mds", "parse_groups", "path_statistics",
           "pca_directions", "summary_lines", "trajectory_map", "trajectory_pca", "variant_data"]
