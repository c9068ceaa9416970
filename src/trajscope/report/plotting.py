"""Plot helpers shared by the panels: step series of one or several runs, their legends, status marks.

With one run, each series has its own colour and a legend entry. With several runs, each run has
one colour (legend: the run with the config values that differ) and the series are told apart by
line style (a second legend block).

Series labels are matplotlib text (mathtext allowed): a caller that builds one from run data (a
scalar or group name) passes it through :func:`~trajscope.report.style.text` first. Run legends
are escaped here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from trajscope.report import style
from trajscope.report.data import RunData

FEW_POINTS = 40  # series with at most this many points get markers (evaluations, probes)


def present(runs: Sequence[RunData], names: Sequence[str]) -> list[str]:
    """The scalar names that at least one run holds, in the given order."""
    return [n for n in names if any(r.has(n) for r in runs)]


def line(ax, x, y, i_run: int, j_series: int, n_runs: int, label: str | None = None, **kw) -> None:
    """One series in the report style (markers when it has few points)."""
    st = style.style(i_run, j_series, n_runs)
    marker = "o" if len(x) <= FEW_POINTS else None
    ax.plot(x, y, marker=marker, markersize=3, label=label or None, **st, **kw)


def lines(ax, runs: Sequence[RunData], series: Sequence[tuple[str, str]]) -> list[np.ndarray]:
    """Plot scalars ``series`` [(name, label)] of every run; return the plotted value arrays."""
    plotted = []
    for i, r in enumerate(runs):
        for j, (name, label) in enumerate(series):
            x, y = r.series(name)
            if len(x):
                line(ax, x, y, i, j, len(runs), label if len(runs) == 1 else None)
                plotted.append(y)
    return plotted


def legend(ax, runs: Sequence[RunData], series_labels: Sequence[str] = ()) -> None:
    """The legend: series labels for one run (in the axes); for several, runs by colour and series
    by line style, below the figure (``ax``'s reference lines, e.g. the target, included)."""
    if len(runs) <= 1:
        style.legend(ax)
        return
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=style.style(i, 0, len(runs))["color"]) for i in range(len(runs))]
    labels = [style.text(r.legend) for r in runs]
    if len(series_labels) > 1:
        handles += [Line2D([], [], color="0.3", linestyle=style.LINESTYLES[j % len(style.LINESTYLES)])
                    for j in range(len(series_labels))]
        labels += list(series_labels)
    extra_handles, extra_labels = ax.get_legend_handles_labels()  # reference lines (target, status)
    labels += extra_labels
    ax.figure.legend(handles + extra_handles, labels, loc="outside lower center",
                     ncols=min(len(labels), 3 if max(map(len, labels)) < 40 else 1))


def series_key(ax, labels: Sequence[str]) -> None:
    """An in-axes legend of line styles (the series of several runs, told apart by style)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", linestyle=style.LINESTYLES[j % len(style.LINESTYLES)])
               for j in range(len(labels))]
    ax.legend(handles, list(labels), loc="best", fontsize=7)


def mark_status(ax, runs: Sequence[RunData]) -> None:
    """A dotted vertical line where a run crashed or diverged."""
    for r in runs:
        if r.status in ("crashed", "diverged"):
            step = r.meta.get("status_step")
            step = r.last_step if step is None else step
            ax.axvline(step, color=style.OKABE_ITO["vermillion"], linestyle=":", linewidth=1.2,
                       label=f"{r.status} ({style.text(r.label)})" if len(runs) > 1 else r.status)


def step_plot(runs: Sequence[RunData], series: Sequence[tuple[str, str]], ylabel: str,
              both_axes: bool = True, hlines: Sequence[tuple[float, str]] = (), status: bool = True):
    """A figure of scalar ``series`` against steps: linear and log step axes side by side
    (``both_axes``) or the log one alone; a log y axis where the values span decades."""
    fig, axes = style.figure(2 if both_axes else 1)
    for k, ax in enumerate(axes):
        plotted = lines(ax, runs, series)
        for value, label in hlines:
            ax.axhline(value, color="0.4", linestyle="--", linewidth=1, label=style.text(label))
        if status:
            mark_status(ax, runs)
        style.step_axis(ax, log=not both_axes or k == 1)
        style.log_y_if_spans(ax, *plotted)
        ax.set_ylabel(ylabel)
    legend(axes[0], runs, [label for _, label in series])
    return fig
