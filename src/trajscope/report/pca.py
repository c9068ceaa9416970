"""Panel: PCA of the trajectory, from the ``pca:<group>`` results of ``trajscope analyze``: the
explained variance ratio of the top components and the trajectory in its top-two plane."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from trajscope.report import style
from trajscope.report.data import RunData, fmt
from trajscope.report.panel import Panel, Table

TOP = 10


def _group(r: RunData) -> str | None:
    groups = r.groups("pca")
    return groups[0] if groups else None  # "all" sorts first


def _variance(ax, runs, found) -> None:
    for i, r in enumerate(runs):
        ratio = np.asarray(found[r.id]["explained_variance_ratio"], dtype=float)[:TOP]
        k = np.arange(1, len(ratio) + 1)
        st = style.style(i, 0, len(runs))
        ax.plot(k, ratio, marker="o", markersize=4, color=st["color"], label=style.text(r.legend))
    ax.set_yscale("log")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.set_xticks(range(1, TOP + 1))


def _plane(fig, ax, runs, found) -> None:
    for i, r in enumerate(runs):
        res = found[r.id]
        xy = np.asarray(res["coords"], dtype=float)
        if xy.ndim != 2 or xy.shape[1] < 2:
            continue
        steps = np.asarray(res["coord_steps"], dtype=float)
        color = style.style(i, 0, len(runs))["color"]
        ax.plot(xy[:, 0], xy[:, 1], color="0.6" if len(runs) == 1 else color, linewidth=1, zorder=1)
        if len(runs) == 1:
            from matplotlib.colors import SymLogNorm

            sc = ax.scatter(xy[:, 0], xy[:, 1], c=steps, s=12, cmap=style.SEQUENTIAL, zorder=2,
                            norm=SymLogNorm(linthresh=1.0, vmin=0, vmax=max(steps.max(), 1)))
            fig.colorbar(sc, ax=ax, label="step (log scale)")
        ax.scatter(xy[:1, 0], xy[:1, 1], marker="s", s=30, color="black", zorder=3,
                   label="init" if i == 0 else None)
        ax.scatter(xy[-1:, 0], xy[-1:, 1], marker="*", s=70, color=color if len(runs) > 1 else "black",
                   zorder=3, label="last step" if i == 0 else None)
    ax.set_xlabel("PC 1 (parameter units)")
    ax.set_ylabel("PC 2 (parameter units)")
    style.legend(ax)


def pca(runs: Sequence[RunData]) -> Panel | None:
    found = {r.id: r.result(f"pca:{g}") for r in runs if (g := _group(r)) is not None}
    if not found:
        return None
    shown = [r for r in runs if r.id in found]
    p = Panel("pca", "PCA of the trajectory",
              "Principal components of the recorded parameter vectors (each point weighs the same, "
              "so the dense early snapshots weigh most). Left: the share of variance of the top "
              f"{TOP} components; right: the trajectory in the plane of the top two, with each "
              "run's own axes.")
    fig, axes = style.figure(2)
    _variance(axes[0], shown, found)
    _plane(fig, axes[1], shown, found)
    if len(shown) > 1:
        style.legend(axes[0])
    p.add("pca", "Explained variance ratio (log scale) and the trajectory in its top-two PCA plane.", fig)
    rows = [([r.label] if len(shown) > 1 else []) +
            [found[r.id].get("group", "all"), found[r.id].get("source", "-"), fmt(found[r.id].get("components_90")),
             fmt(found[r.id].get("components_99")), fmt(found[r.id].get("effective_dim"))] for r in shown]
    head = (["run"] if len(shown) > 1 else []) + ["group", "source", "components for 90%",
                                                  "components for 99%", "effective dimension"]
    p.tables.append(Table(head, rows, "Effective dimension: the participation ratio (Σλ)² / Σλ²."))
    return p
