"""Panel: training regimes from the regime probe (``regime/*`` scalars).

``regime/similarity`` (the activation similarity s against ``delta`` steps earlier) and any other
``regime/*`` scalar except the diagnostics ``lag`` and ``fallback`` are drawn as lines; the bands
come from ``regime/label``, coded 0 = chaotic, 1 = transition, 2 = stable (:data:`REGIMES`), a
band lasting from its step to the next measured one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from trajscope.report import style
from trajscope.report.data import RunData
from trajscope.report.panel import Panel
from trajscope.report.plotting import legend, lines

LABEL = "regime/label"
DIAGNOSTICS = {LABEL, "regime/lag", "regime/fallback"}
REGIMES = {0: ("chaotic", style.OKABE_ITO["vermillion"]), 1: ("transition", style.OKABE_ITO["orange"]),
           2: ("stable", style.OKABE_ITO["green"])}


def _bands(ax, runs: Sequence[RunData]) -> None:
    """One row per run: coloured spans of the labelled regime from each measured step to the next."""
    from matplotlib.patches import Patch

    for i, r in enumerate(runs):
        steps, codes = r.series(LABEL)
        ends = np.append(steps[1:], max(r.last_step, steps[-1] + 1)) if len(steps) else steps
        for s, e, c in zip(steps, ends, codes):
            color = REGIMES.get(int(round(c)), ("unknown", "0.7"))[1]
            ax.broken_barh([(s, max(e - s, 1))], (i - 0.4, 0.8), color=color, linewidth=0)
    ax.set_yticks(range(len(runs)), labels=[style.text(r.label) for r in runs])
    ax.set_ylim(-0.6, len(runs) - 0.4)
    ax.grid(False)
    ax.legend([Patch(color=c) for _, c in REGIMES.values()], [n for n, _ in REGIMES.values()],
              loc="center left", bbox_to_anchor=(1.01, 0.5))


def _fallback_note(runs: Sequence[RunData]) -> str:
    used = [r.label for r in runs if r.has("regime/fallback") and np.nanmax(r.series("regime/fallback")[1]) > 0]
    return (" Some labels used the percentile fallback thresholds (" + ", ".join(used) + ").") if used else ""


def regimes(runs: Sequence[RunData]) -> Panel | None:
    names = sorted({n for r in runs for n in r.names("regime")} - DIAGNOSTICS)
    banded = [r for r in runs if r.has(LABEL)]
    if not names and not banded:
        return None
    p = Panel("regime", "Training regimes",
              "The similarity of the network's activations on a fixed probe set to those a few steps "
              "earlier, and below it the regime each measurement was labelled: chaotic, transition or "
              "stable." + _fallback_note(runs))
    rows = (1 if names else 0) + (1 if banded else 0)
    strip = 0.9 + 0.3 * len(banded)  # inches
    fig, axes = style.figure(1, rows, size=(7.0, (2.6 if names else 0) + (strip if banded else 0)), sharex=True,
                             gridspec_kw={"height_ratios": [2.6, strip] if rows == 2 else [1]})
    if names:
        plotted = lines(axes[0], runs, [(n, style.text(n)) for n in names])
        style.log_y_if_spans(axes[0], *plotted)
        axes[0].set_ylabel("activation similarity s" if names == ["regime/similarity"] else "value")
        legend(axes[0], runs, [style.text(n) for n in names])
    if banded:
        _bands(axes[-1], banded)
    style.shared_step_axes(axes)
    p.add("regime", "Regime scalars and bands (log step axis).", fig)
    return p
