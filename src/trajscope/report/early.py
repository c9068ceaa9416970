"""Panel: early-phase statistics per layer (Frankle, Schwab, Morcos 2020): distance and cosine to
init and the fraction of weights whose sign flipped, from the ``early_statistics:<group>`` results
of ``trajscope analyze`` (or, for a run measured from sketches only, ``path_statistics:all``, which
has no sign flips)."""

from __future__ import annotations

from typing import Sequence

from trajscope.report import style
from trajscope.report.data import RunData, fmt
from trajscope.report.panel import Panel, Table
from trajscope.report.plotting import legend, line

COLUMNS = (("relative_distance_from_init", "relative distance from init |w−w₀|/|w₀|"),
           ("cosine_to_init", "cosine to init cos(w, w₀)"),
           ("sign_flip_fraction", "sign-flip fraction (of weights)"))
HEADERS = {"relative_distance_from_init": "distance from init (relative)", "cosine_to_init": "cosine to init",
           "sign_flip_fraction": "sign-flip fraction"}


def group_label(group: str, mpl: bool = True) -> str:
    """How a group is named in a figure (``mpl``: matplotlib-safe) or a table."""
    return "all parameters" if group == "all" else f"group {style.text(group) if mpl else group}"


def _sources(runs: Sequence[RunData]) -> list[tuple[RunData, str, str]]:
    """(run, result name, group) to plot: every group of one run; the group ``all`` of several."""
    out = []
    for r in runs:
        kind = "early_statistics" if r.groups("early_statistics") else "path_statistics"
        groups = r.groups(kind)
        if len(runs) > 1:
            groups = [g for g in groups if g == "all"] or groups[:1]
        out += [(r, f"{kind}:{g}", g) for g in groups]
    return out


def _figure(runs: Sequence[RunData], sources, columns):
    fig, axes = style.figure(len(columns), size=(8.0, 3.2))
    series = list(dict.fromkeys(g for _, _, g in sources))
    for ax, (col, ylabel) in zip(axes, columns):
        for r, name, g in sources:
            res = r.result(name)
            if col in res:
                i, j = runs.index(r), series.index(g)
                line(ax, res["step"], res[col], i, j, len(runs), group_label(g) if len(runs) == 1 else None)
        style.step_axis(ax, log=True)
        ax.set_title(ylabel)
    legend(axes[0], runs, [group_label(g) for g in series])
    return fig


def _final_table(runs: Sequence[RunData], sources, columns) -> Table:
    rows = []
    for r, name, g in sources:
        res = r.result(name)
        cells = [fmt(float(res[c][-1])) if c in res and len(res[c]) else "-" for c, _ in columns]
        rows.append(([r.label] if len(runs) > 1 else []) + [group_label(g, mpl=False), fmt(int(res["step"][-1]))] + cells)
    head = (["run"] if len(runs) > 1 else []) + ["group", "step"] + [HEADERS[c] for c, _ in columns]
    return Table(head, rows, "At the last snapshot.")


def early_phase(runs: Sequence[RunData]) -> Panel | None:
    sources = _sources(runs)
    if not sources:
        return None
    kinds = {name.split(":", 1)[0] for _, name, _ in sources}
    columns = COLUMNS if "early_statistics" in kinds else COLUMNS[:2]
    p = Panel("early", "Early-phase statistics per layer",
              "How far each group of weights moved from its initialization (L2 distance relative to "
              "the initial norm), the cosine between the weights and their initial values, and the "
              "fraction of weights whose sign differs from init, at every snapshot.")
    p.add("statistics", "Distance, cosine and sign flips against init (log step axis).",
          _figure(runs, sources, columns))
    p.tables.append(_final_table(runs, sources, columns))
    if "early_statistics" not in kinds:
        p.intro += " Measured from sketches, so without sign flips."
    return p
