"""``trajscope analyze``: every trajectory measure of a run, stored in the run, and a JSON summary.

Per group (see :data:`~trajscope.measures.groups.GROUP_HELP`), from snapshots (exact) or sketches
(group ``all`` only), it stores these results in the run (``Run.load_result(name)``, or
``<Class>.load(run, name)`` to get the object back):

- ``trajectory_map.<variant>:<group>`` and ``mds.<variant>:<group>`` for the variants ``theta``,
  ``displacement`` and ``updates`` (window ``window`` points);
- ``path_statistics:<group>``, ``pca:<group>``, and (exact only) ``early_statistics:<group>``;
- ``analyze``: the summary that :func:`analyze` returns.

Summary (JSON; NaN as null): ``{"run_id", "path", "window", "groups": {<group>: {...}}, "results",
"sketch"}``, per group: ``source``, ``n_points``, ``first_step``, ``final_step``, ``mds`` (theta
variant, diagonal excluded), ``mds_displacement``, ``mds_updates``, ``mds_window`` (theta; an object
of lists ``start_step``, ``end_step``, ``mds_window`` and the ``width`` and ``stride`` in points),
``mds_window_displacement``, ``mds_window_updates``, ``update_cosine_mean``, ``straightness``,
``effective_dim``, ``pca_components_90``, ``pca_components_99``, ``explained_variance_ratio`` (top
10), ``distance_from_init_final``, ``relative_distance_from_init_final``, ``cosine_to_init_final``,
``sign_flip_fraction_final`` and ``grad_norm_final`` (null when measured from sketches).
"""

from __future__ import annotations

import os

from trajscope.measures.directional import MDSResult, mds, trajectory_map
from trajscope.measures.early import EarlyStatistics, early_statistics_many
from trajscope.measures.groups import Group
from trajscope.measures.path import PathStatistics, path_statistics
from trajscope.measures.pca import TrajectoryPCA, trajectory_pca
from trajscope.measures.results import Result, jsonable
from trajscope.measures.trajectory import Trajectory
from trajscope.measures.vectors import VARIANTS, exact_grams, sketch_bounds
from trajscope.store import Run


def _suffix(variant: str) -> str:
    return "" if variant == "theta" else f"_{variant}"


def _final(values) -> float:
    return float(values[-1]) if len(values) else float("nan")


def group_summary(mdss: dict[str, MDSResult | None], path: PathStatistics, pca: TrajectoryPCA,
                  early: EarlyStatistics | None) -> dict:
    """The summary object of one group (module docstring)."""
    out = {"source": path.source, "n_points": len(path.step), "first_step": int(path.step[0]),
           "final_step": int(path.step[-1])}
    for v in VARIANTS:
        r = mdss.get(v)
        out[f"mds{_suffix(v)}"] = r.mds if r is not None else None
        out[f"mds_window{_suffix(v)}"] = r.window_series() if r is not None else None
    out.update(update_cosine_mean=path.update_cosine_mean, straightness=path.straightness_final,
               effective_dim=pca.effective_dim, pca_components_90=pca.components_90,
               pca_components_99=pca.components_99,
               explained_variance_ratio=pca.explained_variance_ratio[:10].tolist(),
               distance_from_init_final=_final(path.distance_from_init),
               relative_distance_from_init_final=_final(path.relative_distance_from_init),
               cosine_to_init_final=_final(path.cosine_to_init),
               sign_flip_fraction_final=early.final("sign_flip_fraction") if early else None,
               grad_norm_final=early.final("grad_norm") if early else None)
    return out


def measure_group(traj: Trajectory, g: Group, source: str, window: int = 1, width: int | None = None,
                  stride: int | None = None, early: EarlyStatistics | None = None, show: bool = False,
                  **pass_options) -> tuple[list[Result], dict]:
    """All measures of one group from one ``source``: (results, summary object)."""
    exact = source == "snapshots"
    n = len(traj.points(source))
    if exact:  # one pass for theta, displacement and updates
        exact_grams(traj, g, traj.points(source), [window], show, **pass_options)
    results: list[Result] = []
    mdss: dict[str, MDSResult | None] = {}
    for v in VARIANTS:
        if v == "updates" and not 1 <= window < n:
            mdss[v] = None
            continue
        results.append(trajectory_map(traj, g, v, window, exact, show=show, **pass_options))
        mdss[v] = mds(traj, g, v, window, exact, width=width, stride=stride, show=show, **pass_options)
        results.append(mdss[v])
    path = path_statistics(traj, g, exact, show=show)
    pca = trajectory_pca(traj, g, exact, show=show, **pass_options)
    results += [path, pca] + ([early] if early is not None else [])
    return results, group_summary(mdss, path, pca, early)


def analyze(run_ref_or_path, root: str | os.PathLike | None = None, groups=None, exact: bool | None = None,
            progress: bool = True, *, window: int = 1, width: int | None = None, stride: int | None = None,
            save: bool = True, **pass_options) -> dict:
    """Compute every trajectory measure of a run for ``groups``, store them in the run, return the summary.

    ``run_ref_or_path``: a run directory, id, unique id prefix or name (under ``root``), or a
    :class:`Run`.  ``groups``: group specs (default ``["all"]``).  ``exact``: True = snapshots,
    False = sketches (group ``all`` only), None = snapshots when the run has them.  ``window``: the
    window (in points) of the ``updates`` variant; ``width``/``stride``: of the sliding MDS (default
    about 100 windows of a tenth of the points).  ``save``: store the results (takes the run's write
    lock, so it fails at once if another process is writing the run).  ``pass_options``
    (``budget_bytes``, ``block``, ``dtype``, ``device``) tune the exact Gram pass.
    """
    if isinstance(run_ref_or_path, Run):
        run, owned = run_ref_or_path, False
    else:
        from trajscope.store.runs import resolve

        run, owned = Run.open(resolve(str(run_ref_or_path), root), write=save), True
    try:
        traj = Trajectory(run)
        gs = traj.groups(groups)
        sources = {g.name: traj.source(g, exact) for g in gs}  # fails before any work
        exact_gs = [g for g in gs if sources[g.name] == "snapshots"]
        early = {e.group: e for e in early_statistics_many(traj, exact_gs, show=progress)} if exact_gs else {}
        results: list[Result] = []
        per_group = {}
        for g in gs:
            res, per_group[g.name] = measure_group(traj, g, sources[g.name], window, width, stride,
                                                   early.get(g.name), progress, **pass_options)
            results += res
            for key in [k for k in traj.cache if k[0] == "grams"]:
                del traj.cache[key]  # free this group's Gram matrices
        summary = {"run_id": run.id, "path": str(run.path), "window": window, "groups": per_group,
                   "results": [r.name for r in results] + (["analyze"] if save else []),
                   "sketch": sketch_bounds(traj) if "sketches" in sources.values() else None}
        summary = jsonable(summary)
        if save:
            for r in results:
                r.save(run)
            run.save_result("analyze", summary)
        return summary
    finally:
        if owned:
            run.close()


def summary_lines(summary: dict) -> list[str]:
    """The summary as short text lines, one per group (what ``trajscope analyze`` prints without --json)."""

    def f(v, fmt=".3f"):
        return "-" if v is None else format(v, fmt)

    lines = [f"run {summary['run_id']}: trajectory measures (updates window {summary['window']} points)"]
    for name, g in summary["groups"].items():
        lines.append(
            f"  {name} [{g['source']}, {g['n_points']} points, steps {g['first_step']}-{g['final_step']}]: "
            f"mds {f(g['mds'])}  mds_displacement {f(g['mds_displacement'])}  mds_updates {f(g['mds_updates'])}  "
            f"straightness {f(g['straightness'])}  effective_dim {f(g['effective_dim'], '.2f')}  "
            f"pca_components_90 {g['pca_components_90']}  distance_from_init_final "
            f"{f(g['distance_from_init_final'], '.4g')}  sign_flip_fraction_final {f(g['sign_flip_fraction_final'])}")
    if summary.get("results"):
        lines.append(f"  stored {len(summary['results'])} results in {summary['path']}")
    return lines
