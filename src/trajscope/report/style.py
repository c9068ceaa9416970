"""One style for every report figure: Okabe-Ito colours, labelled axes, log axes where data spans decades.

Figures are plain :class:`matplotlib.figure.Figure` objects (no pyplot, so no global figure state
and no display backend; PNGs are rendered by Agg), about 7 x 3.5 in at 100 dpi, and are turned into
PNG bytes at once (:func:`png`) so that a report never holds many open figures.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

# Okabe and Ito (2008), the colour-blind-safe palette; ordered for lines on white (yellow last).
OKABE_ITO = {"blue": "#0072B2", "orange": "#E69F00", "green": "#009E73", "vermillion": "#D55E00",
             "purple": "#CC79A7", "sky": "#56B4E9", "black": "#000000", "yellow": "#F0E442"}
PALETTE = tuple(OKABE_ITO.values())
LINESTYLES = ("-", "--", ":", "-.")
SEQUENTIAL = "viridis"  # perceptually uniform and colour-blind safe (heatmaps, colour by step)

FIGSIZE = (7.0, 3.5)  # inches
DPI = 100
DECADES = 20.0  # a positive series whose max/min exceeds this gets a log axis

RC = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.4,
    "savefig.dpi": DPI, "figure.dpi": DPI, "image.cmap": SEQUENTIAL, "legend.frameon": False,
}


@contextmanager
def context() -> Iterator[None]:
    """The report's matplotlib rcParams, for building and saving figures."""
    import matplotlib
    from cycler import cycler

    rc = dict(RC, **{"axes.prop_cycle": cycler(color=PALETTE)})  # cycler: a matplotlib dependency
    with matplotlib.rc_context(rc):
        yield


def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = FIGSIZE, **kw):
    """(fig, axes) with constrained layout; ``axes`` is a flat list."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, list(axes.ravel())


def png(fig) -> bytes:
    """The figure as PNG bytes (no timestamp metadata, so equal figures give equal bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    fig.clf()
    return buf.getvalue()


def text(s: object) -> str:
    """A user string made safe for matplotlib: ``$`` would start mathtext (and can fail to parse)."""
    return str(s).replace("\\", "\\\\").replace("$", r"\$")


def style(i_run: int, j_series: int, n_runs: int) -> dict:
    """Line style of series ``j_series`` of run ``i_run``: one run colours its series; several runs
    get one colour each and tell their series apart by line style."""
    if n_runs <= 1:
        return {"color": PALETTE[j_series % len(PALETTE)],
                "linestyle": LINESTYLES[(j_series // len(PALETTE)) % len(LINESTYLES)]}
    return {"color": PALETTE[i_run % len(PALETTE)], "linestyle": LINESTYLES[j_series % len(LINESTYLES)]}


def spans_decades(values: Sequence[float] | np.ndarray, ratio: float = DECADES) -> bool:
    """True if the finite values are all positive and max/min exceeds ``ratio``."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return v.size > 1 and bool((v > 0).all()) and v.max() / v.min() > ratio


def log_y_if_spans(ax, *series) -> None:
    """Log y axis when the plotted series together span decades."""
    vals = [np.asarray(s, dtype=float).ravel() for s in series if s is not None and len(s)]
    if vals and spans_decades(np.concatenate(vals)):
        ax.set_yscale("log")


def step_axis(ax, log: bool, label: str = "step", lo: float | None = None) -> None:
    """An optimizer-step x axis: linear, or symmetric-log (linear below 1, so that step 0, the
    init, shows when it is plotted). ``lo``: the smallest step plotted (default: ``ax``'s data)."""
    if log:
        ax.set_xscale("symlog", linthresh=1.0)
        lo = ax.dataLim.x0 if lo is None else lo
        ax.set_xlim(left=lo / 1.25 if np.isfinite(lo) and lo >= 1 else -0.15)
        ax.set_xlabel(f"{label} (log scale)")
    else:
        ax.set_xlabel(label)


def shared_step_axes(axes, label: str = "step") -> None:
    """Log step axes stacked with a shared x: one range covering every axes' data, one label."""
    lo = min(ax.dataLim.x0 for ax in axes)
    for ax in axes:
        step_axis(ax, True, label, lo)
        ax.set_xlabel("")
    axes[-1].set_xlabel(f"{label} (log scale)")


def legend(ax, **kw) -> None:
    """A legend if the axes has labelled artists (small, outside the data where possible)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc=kw.pop("loc", "best"), **kw)
