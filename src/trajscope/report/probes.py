"""Panels of online probe scalars (``<probe>/<quantity>``), each shown when a run holds its scalars.

- sharpness: ``sharpness/lambda_max`` (and ``sharpness/preconditioned_lambda_max`` for Adam)
  against ``sharpness/stability_threshold``, and ``sharpness/stability_ratio`` against 1;
- ``trace/*``, ``noise/*``, ``kernel/*``: every scalar of the prefix, one axis per quantity, where
  ``<prefix>/<q>/<part>`` (e.g. ``noise/snr/<tensor>``) joins the axis of ``<prefix>/<q>``.

The regime probe's scalars have their own panel (:mod:`trajscope.report.regimes`).
"""

from __future__ import annotations

from typing import Sequence

from trajscope.report import style
from trajscope.report.data import RunData, natural_key
from trajscope.report.panel import Panel
from trajscope.report.plotting import legend, lines, mark_status, present, series_key

SHARPNESS = (("sharpness/lambda_max", "λ_max (top Hessian eigenvalue)"),
             ("sharpness/preconditioned_lambda_max", "preconditioned λ_max (Adam)"),
             ("sharpness/stability_threshold", "stability threshold (2/η, (2+2β)/η, ...)"))
GENERIC = (("trace", "Hessian trace", "Scalars of the trace probe."),
           ("noise", "Gradient noise", "The gradient-noise probe: the simple noise scale, the gradient "
                                      "signal-to-noise ratio and the share of the gradient in the top "
                                      "Hessian eigenspace."),
           ("kernel", "Kernel velocity", "The kernel probe: the empirical NTK on a fixed probe set, its "
                                         "distance from the reference and its velocity per step."))
ORDER = {"noise": ("b_simple", "snr", "top_overlap", "trace_cov", "grad_sq_norm"),
         "kernel": ("distance", "velocity", "trace")}
LABELS = {"noise/b_simple": "noise scale B (examples)", "noise/snr": "signal-to-noise ratio",
          "noise/top_overlap": "|P_k g|² / |g|²", "noise/trace_cov": "tr(Σ)", "noise/grad_sq_norm": "|G|²",
          "kernel/distance": "S(K_ref, K_t)", "kernel/velocity": "distance per step", "kernel/trace": "tr(K) / N"}
PER_FIGURE = 3


def _series_present(runs, series):
    names = present(runs, [n for n, _ in series])
    return [s for s in series if s[0] in names]


def sharpness(runs: Sequence[RunData]) -> Panel | None:
    series = _series_present(runs, SHARPNESS)
    ratio = present(runs, ["sharpness/stability_ratio"])
    if not series and not ratio:
        return None
    p = Panel("sharpness", "Sharpness and the stability threshold",
              "The top eigenvalue of the loss Hessian against the optimizer's stability threshold: "
              "above it (ratio > 1) the step size is beyond the edge of stability.")
    fig, axes = style.figure(2 if series and ratio else 1)
    if series:
        plotted = lines(axes[0], runs, series)
        style.log_y_if_spans(axes[0], *plotted)
        axes[0].set_ylabel("Hessian eigenvalue")
        legend(axes[0], runs, [label for _, label in series])
    if ratio:
        ax = axes[-1]
        plotted = lines(ax, runs, [(ratio[0], "stability ratio")])
        ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1, label="edge of stability (1)")
        style.log_y_if_spans(ax, *plotted)
        ax.set_ylabel("λ / threshold")
        if len(runs) > 1 and not series:
            legend(ax, runs)
        else:
            style.legend(ax)
    for ax in axes:
        mark_status(ax, runs)
        style.step_axis(ax, log=True)
    p.add("sharpness", "Sharpness (left) and its ratio to the threshold (right), log step axis.", fig)
    return p


def quantities(runs: Sequence[RunData], prefix: str) -> dict[str, list[str]]:
    """{quantity: scalar names}: ``<prefix>/<q>`` and every ``<prefix>/<q>/<part>`` (e.g. per tensor)
    share the axis of ``q``; known quantities first (:data:`ORDER`), then in natural order."""
    out: dict[str, list[str]] = {}
    for n in sorted({n for r in runs for n in r.names(prefix)}, key=natural_key):
        out.setdefault(n.split("/")[1], []).append(n)
    order = ORDER.get(prefix, ())
    return dict(sorted(out.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order),
                                                    natural_key(kv[0]))))


def _series_label(name: str, base: str) -> str:
    return "all" if name == base else style.text(name[len(base) + 1:])


def _grid(runs: Sequence[RunData], prefix: str, chunk: dict[str, list[str]]):
    """One axis per quantity (its sub-series overlaid), every run overlaid."""
    fig, axes = style.figure(len(chunk), size=(max(3.6, 2.5 * len(chunk) + 0.5), 3.2))
    for ax, (q, names) in zip(axes, chunk.items()):
        base = f"{prefix}/{q}"
        series = [(n, _series_label(n, base)) for n in names]
        plotted = lines(ax, runs, series)
        style.log_y_if_spans(ax, *plotted)
        style.step_axis(ax, log=True)
        ax.set_title(style.text(base))
        ax.set_ylabel(LABELS.get(base, style.text(q)))
        if len(series) > 1:
            style.legend(ax, fontsize=7) if len(runs) == 1 else series_key(ax, [label for _, label in series])
    if len(runs) > 1:
        legend(axes[0], runs)  # the runs, once, below the figure
    return fig


def _generic(prefix: str, title: str, intro: str):
    def build(runs: Sequence[RunData]) -> Panel | None:
        qs = quantities(runs, prefix)
        if not qs:
            return None
        p = Panel(prefix, title, intro + " Log step axis; log value axis where a quantity spans decades.")
        items = list(qs.items())
        for k in range(0, len(items), PER_FIGURE):
            chunk = dict(items[k:k + PER_FIGURE])
            p.add(f"{k // PER_FIGURE}", "; ".join(f"{prefix}/{q}" for q in chunk), _grid(runs, prefix, chunk))
        return p

    build.__name__ = prefix
    return build


trace, noise, kernel = (_generic(*g) for g in GENERIC)
