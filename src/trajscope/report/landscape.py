"""Panel: loss-landscape slices with the trajectory drawn on them, from results named ``landscape*``.

A landscape result holds (tensors; the first name found of each list):

- the grid: ``x`` (n,) [``alphas``, ``xcoordinates``] and, for a 2-D slice, ``y`` (m,) [``betas``,
  ``ycoordinates``];
- ``loss`` [``losses``, ``train_loss``, ``values``]: (n,) for 1-D; (n, m) for 2-D with
  ``loss[i, j]`` the loss at (x[i], y[j]) (as a loop over x then y writes it; JSON ``indexing: "xy"``
  for the (m, n) layout);
- optionally ``trajectory`` [``path``, ``coords``]: (T, 2) coordinates of the recorded steps in the
  slice's plane, (T,) for a 1-D slice, and ``trajectory_steps`` (T,);

and optionally JSON ``x_label``, ``y_label``, ``loss_label`` and ``title``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from trajscope.report import style
from trajscope.report.data import RunData
from trajscope.report.panel import Panel

ALIASES = {"x": ("x", "alphas", "alpha", "xcoordinates"), "y": ("y", "betas", "beta", "ycoordinates"),
           "loss": ("loss", "losses", "train_loss", "values"), "trajectory": ("trajectory", "path", "coords")}


def _get(res: dict, key: str) -> np.ndarray | None:
    for k in ALIASES[key]:
        if k in res and isinstance(res[k], np.ndarray):
            return np.asarray(res[k], dtype=float)
    return None


def grid(res: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray] | None:
    """(x, y or None, Z) with Z (m, n) as matplotlib's contour takes it (or (n,) for 1-D); None if unusable."""
    x, y, z = _get(res, "x"), _get(res, "y"), _get(res, "loss")
    if x is None or z is None:
        return None
    if y is None or z.ndim == 1:
        return (x, None, z) if z.shape == x.shape else None
    if res.get("indexing") == "xy" and z.shape == (len(y), len(x)):
        return x, y, z
    if z.shape == (len(x), len(y)):
        return x, y, z.T
    return (x, y, z) if z.shape == (len(y), len(x)) else None


def _contours(fig, ax, x, y, Z, label: str) -> None:
    finite = Z[np.isfinite(Z)]
    kw: dict[str, Any] = {"cmap": style.SEQUENTIAL}
    if style.spans_decades(finite):
        from matplotlib.colors import LogNorm

        kw["norm"] = LogNorm(vmin=finite.min(), vmax=finite.max())
        kw["levels"] = np.geomspace(finite.min(), finite.max(), 16)
    else:
        kw["levels"] = 16
    cs = ax.contourf(x, y, Z, **kw)
    ax.contour(x, y, Z, levels=cs.levels, colors="white", linewidths=0.4, alpha=0.6)
    cb = fig.colorbar(cs, ax=ax, label=label)
    if "norm" in kw:  # ticks at 1, 2, 5 x 10^k rather than at the (geometric) contour levels
        from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

        cb.ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        cb.ax.yaxis.set_minor_locator(NullLocator())
    ax.grid(False)


def _path_2d(ax, res: dict) -> None:
    """The trajectory on a 2-D slice: a line through the recorded steps, init and last step marked."""
    path = _get(res, "trajectory")
    if path is None or path.ndim != 2 or path.shape[1] < 2 or not len(path):
        return
    ax.plot(path[:, 0], path[:, 1], color=style.OKABE_ITO["orange"], marker="o", markersize=2.5,
            linewidth=1.2, label="trajectory")
    ax.scatter(path[:1, 0], path[:1, 1], marker="s", s=35, color="white", edgecolor="black", zorder=3,
               label="init")
    ax.scatter(path[-1:, 0], path[-1:, 1], marker="*", s=90, color="white", edgecolor="black", zorder=3,
               label="last step")
    ax.legend(loc="upper right", frameon=True, framealpha=0.8)


def _path_1d(ax, res: dict, x: np.ndarray, Z: np.ndarray) -> None:
    """The trajectory on a 1-D slice: its positions marked on the loss curve."""
    path = _get(res, "trajectory")
    if path is None or path.ndim != 1 or not len(path):
        return
    ax.plot(path, np.interp(path, x, Z), linestyle="none", marker="o", markersize=3,
            color=style.OKABE_ITO["orange"], label="trajectory (projected)")
    ax.legend(loc="best")


def landscape_figure(res: dict[str, Any], g):
    x, y, Z = g
    xlabel = style.text(res.get("x_label", "direction 1 (filter-normalized units)"))
    loss_label = style.text(res.get("loss_label", "loss"))
    fig, axes = style.figure(1, size=(7.0, 3.5) if y is None else (6.0, 4.6))
    ax = axes[0]
    if y is None:
        ax.plot(x, Z, color=style.OKABE_ITO["blue"])
        style.log_y_if_spans(ax, Z)
        ax.set_ylabel(loss_label)
        _path_1d(ax, res, x, Z)
    else:
        _contours(fig, ax, x, y, Z, loss_label)
        ax.set_ylabel(style.text(res.get("y_label", "direction 2 (filter-normalized units)")))
        _path_2d(ax, res)
    ax.set_xlabel(xlabel)
    return fig


def landscape(runs: Sequence[RunData]) -> Panel | None:
    p = Panel("landscape", "Loss landscape",
              "Loss on a slice through parameter space around the trajectory, with the recorded "
              "trajectory projected onto the slice.")
    for r in runs:
        for name in r.result_names("landscape"):
            res = r.result(name)
            g = grid(res)
            if g is None:
                continue
            who = f"{r.label}: " if len(runs) > 1 else ""
            title = res.get("title") or name
            key = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{r.id}-{name}")
            p.add(key if len(runs) > 1 else key.split("-", 1)[1], f"{who}{title}", landscape_figure(res, g))
    return p or None
