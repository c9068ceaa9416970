"""Panel: the trajectory map as a heatmap and the mean directional similarity (MDS) over time
(Singh et al. 2024), from the ``trajectory_map.<variant>:<group>`` and ``mds.<variant>:<group>``
results of ``trajscope analyze``; shown for the group ``all`` (or the first group analyzed)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from trajscope.report import style
from trajscope.report.data import RunData, fmt
from trajscope.report.panel import Panel, Table
from trajscope.report.plotting import legend, line

VARIANTS = {"theta": r"$\theta_t$", "displacement": r"$\theta_t - \theta_0$",
            "updates": r"updates $\theta_{t+w} - \theta_t$"}


def label(variant: str) -> str:
    return VARIANTS.get(variant) or style.text(variant)


def _variants(r: RunData, kind: str) -> tuple[str | None, list[str]]:
    """(group, variants) of ``kind`` results (``trajectory_map`` or ``mds``) in the run."""
    found: dict[str, list[str]] = {}
    for name in r.result_names(kind + "."):
        variant, _, group = name[len(kind) + 1:].partition(":")
        found.setdefault(group, []).append(variant)
    if not found:
        return None, []
    group = "all" if "all" in found else sorted(found)[0]
    order = list(VARIANTS) + sorted(set(found[group]) - set(VARIANTS))
    return group, [v for v in order if v in found[group]]


def _ticks(ax, steps: np.ndarray) -> None:
    """Ticks at about five points, labelled by their step (the map's axes index recorded points)."""
    idx = np.unique(np.linspace(0, len(steps) - 1, min(5, len(steps))).round().astype(int))
    labels = [str(int(steps[k])) for k in idx]
    ax.set_xticks(idx, labels=labels)
    ax.set_yticks(idx, labels=labels)


def heatmaps(r: RunData, group: str, variants: list[str]):
    fig, axes = style.figure(len(variants), size=(max(3.2, 2.6 * len(variants) + 0.4), 3.0))
    for k, (ax, v) in enumerate(zip(axes, variants)):
        res = r.result(f"trajectory_map.{v}:{group}")
        C = np.asarray(res["cosine"], dtype=float)
        finite = C[np.isfinite(C)]
        im = ax.imshow(C, cmap=style.SEQUENTIAL, interpolation="nearest",
                       vmin=float(finite.min()) if finite.size else 0.0, vmax=1.0)
        _ticks(ax, np.asarray(res["end_steps"]))
        ax.grid(False)
        ax.set_title(label(v))
        ax.set_xlabel("step j")
        if k == 0:
            ax.set_ylabel("step i")
        fig.colorbar(im, ax=ax, shrink=0.85, label="cosine C[i, j]" if k == len(variants) - 1 else None)
    return fig


def mds_over_time(runs: Sequence[RunData], found: dict):
    fig, axes = style.figure(1)
    ax = axes[0]
    all_variants = list(dict.fromkeys(v for _, vs in found.values() for v in vs))
    for i, r in enumerate(runs):
        group, variants = found.get(r.id, (None, []))
        for v in variants:
            res = r.result(f"mds.{v}:{group}")
            if len(res.get("mds_window", [])):
                line(ax, res["window_end_step"], res["mds_window"], i, all_variants.index(v), len(runs),
                     label(v) if len(runs) == 1 else None)
    style.step_axis(ax, log=True, label="step at the end of the window")
    ax.set_ylabel("MDS (mean cosine in window)")
    legend(ax, runs, [label(v) for v in all_variants])
    return fig


def _table(runs: Sequence[RunData], found: dict) -> Table:
    rows = []
    for r in runs:
        group, variants = found.get(r.id, (None, []))
        for v in variants:
            res = r.result(f"mds.{v}:{group}")
            rows.append(([r.label] if len(runs) > 1 else []) +
                        [group, v, fmt(res.get("mds")), fmt(res.get("n_points")), res.get("source", "-")])
    head = (["run"] if len(runs) > 1 else []) + ["group", "variant", "MDS", "points", "source"]
    return Table(head, rows, "MDS over the whole recorded trajectory (diagonal excluded).")


def trajectory_maps(runs: Sequence[RunData]) -> Panel | None:
    p = Panel("maps", "Trajectory map and directional similarity",
              "C[i, j] is the cosine between the parameter vectors (or displacements, or updates) at "
              "recorded steps i and j. High values mean a nearly straight, redundant path; low values "
              "directional exploration. The map's axes index the recorded points (dense early), "
              "labelled by step.")
    for i, r in enumerate(runs):
        group, variants = _variants(r, "trajectory_map")
        if variants:
            who = f"{r.label}, " if len(runs) > 1 else ""
            p.add(f"map-{i}" if len(runs) > 1 else "map", f"Trajectory maps ({who}group {group}).",
                  heatmaps(r, group, variants))
    found = {r.id: _variants(r, "mds") for r in runs}
    found = {k: v for k, v in found.items() if v[1]}
    if found:
        p.add("mds", "MDS over sliding windows of recorded points, against the step at the window's end.",
              mds_over_time(runs, found))
        p.tables.append(_table(runs, found))
    return p or None
