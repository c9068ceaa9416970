"""Helpers shared by the studies: reading a trained run's scalars, the model at init, verdict rules.

The verdict rules are the explicit ones each study's table uses (so that every study states a
rule in the same words):

- :func:`factor_verdict`: a measured number against the paper's, ``reproduced`` within a factor
  ``close`` (default 1.5) either way, ``partly`` within ``near`` (default 2.5), else ``not``;
- :func:`count_verdict`: k of n comparisons agree with the paper: all -> ``reproduced``, at least
  half -> ``partly``, fewer -> ``not``;
- :func:`range_verdict`: a number inside the paper's interval -> ``reproduced``, inside the interval
  widened by ``slack`` (a factor on each end) -> ``partly``, else ``not``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from trajscope.config import RunConfig


@contextmanager
def opened(summary: Mapping[str, Any]) -> Iterator[Any]:
    """The run of a training summary (``summary["path"]``), opened read-only and closed after."""
    from trajscope.store import Run

    run = Run.open(summary["path"])
    try:
        yield run
    finally:
        run.close()


def series(summary: Mapping[str, Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the scalar ``name`` of a run, in step order (empty arrays if absent)."""
    with opened(summary) as run:
        df = run.scalars([name])
    return df["step"].to_numpy(np.int64), df["value"].to_numpy(np.float64)


def final_metric(summary: Mapping[str, Any]) -> float:
    """The run's last validation metric (accuracy in [0, 1]); NaN for a diverged or failed run."""
    if summary.get("status") != "finished":
        return math.nan
    return float((summary.get("final") or {}).get("val_metric", math.nan))


def diverged(summary: Mapping[str, Any]) -> bool:
    return summary.get("status") == "diverged"


def init_model(config: RunConfig):
    """(model, data, workload) exactly as the Trainer builds them for ``config`` at step 0: the data
    from the config's seed, then the global torch generator seeded and the model drawn."""
    import torch

    from trajscope import workloads

    wl = workloads.get(config.workload)
    data = wl.make_data(config.seed, config.workload_options)
    torch.manual_seed(config.seed)
    return wl.make_model(config.workload_options), data, wl


def init_sharpness(config: RunConfig, size: int, tol: float = 1e-3, max_iter: int = 100) -> float:
    """lambda_0: the top eigenvalue of the Hessian of the workload's mean training loss on the first
    ``size`` training examples, at the init that a run of ``config`` starts from (all trainable
    parameters; Lanczos to relative residual ``tol``). The same examples a SharpnessProbe with
    ``data="fixed", fixed_size=size`` measures on, so lambda_0 and lambda_t are comparable."""
    from trajscope.functional.hessian import top_hessian_eigenvalues

    model, data, wl = init_model(config)
    batch = (data.x_train[:size], data.y_train[:size])
    return float(top_hessian_eigenvalues(model, wl.loss_fn, batch, 1, tol=tol, max_iter=max_iter).values[0])


def rounded(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits: a learning rate derived from a measured lambda_0 goes
    into a run's config (and so its id); rounding keeps the cache hit when the last bits of lambda_0
    change (a different Lanczos path, thread count or library version)."""
    return float(f"{x:.{digits - 1}e}")


def factor_verdict(measured: float, paper: float, close: float = 1.5, near: float = 2.5) -> tuple[str, str]:
    """(verdict, why) for a positive number against the paper's (module docstring)."""
    if not (math.isfinite(measured) and measured > 0):
        return "not", "nothing could be measured (no finite positive value)"
    factor = max(measured / paper, paper / measured)
    if factor <= close:
        return "reproduced", ""
    verdict = "partly" if factor <= near else "not"
    return verdict, f"{measured:.3g} is {factor:.2f}x {'above' if measured > paper else 'below'} the paper's {paper:g}"


def count_verdict(agree: int, total: int, what: str) -> tuple[str, str]:
    """(verdict, why) when ``agree`` of ``total`` comparisons go the paper's way (module docstring)."""
    if total == 0:
        return "not", f"no {what} could be compared"
    if agree == total:
        return "reproduced", ""
    verdict = "partly" if 2 * agree >= total else "not"
    return verdict, f"only {agree} of {total} {what} go the paper's way"


def range_verdict(measured: float, low: float, high: float, slack: float = 2.0, unit: str = "") -> tuple[str, str]:
    """(verdict, why) for a number against the paper's interval [low, high] (module docstring)."""
    if not math.isfinite(measured):
        return "not", "nothing could be measured"
    if low <= measured <= high:
        return "reproduced", ""
    if low / slack <= measured <= high * slack:
        return "partly", f"{measured:.3g}{unit} is outside the paper's {low:g}-{high:g}{unit} but within {slack:g}x"
    return "not", f"{measured:.3g}{unit} is far from the paper's {low:g}-{high:g}{unit}"


def fmt(x: float, digits: int = 3) -> str:
    """A number for a table cell: ``n/a`` for NaN, else ``digits`` significant digits."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def geometric_midpoint(a: float, b: float) -> float:
    """sqrt(a b): the boundary estimate between two grid points of a log-spaced sweep."""
    return math.sqrt(a * b)


def plot_lines(ax, curves: Sequence[tuple[str, np.ndarray, np.ndarray]], xlabel: str, ylabel: str,
               title: str = "", logy: bool = False, logx: bool = False) -> None:
    """One labelled line per (label, x, y) in the report's palette, legend if several."""
    from trajscope.report import style

    for i, (label, x, y) in enumerate(curves):
        ax.plot(x, y, label=style.text(label), **style.style(0, i, 1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(style.text(title))
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("symlog", linthresh=1)
    if len(curves) > 1:
        ax.legend()
