"""Panel: a timeline of controller decisions and the reason each gave.

A decision is an event of kind ``controller`` in the run's event log: its ``message`` says what was
decided, its JSON ``data`` holds ``reason`` (why) and optionally ``controller`` (the controller's
name; default ``controller``). The figure marks each decision on the learning-rate curve (when the
run logged ``lr``) and on one row per controller; the table lists them with their reasons.
"""

from __future__ import annotations

from typing import Sequence

from trajscope.report import style
from trajscope.report.data import RunData, fmt
from trajscope.report.panel import Panel, Table
from trajscope.report.plotting import legend, lines

KIND = "controller"
MAX_ROWS = 200  # table rows
MAX_LABELS = 30  # numbered markers in the figure


def short(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[:n - 1] + "…"


def decisions(r: RunData) -> list[dict]:
    out = []
    for e in r.events_of(KIND):
        name = e["data"].get("controller") or e["data"].get("name") or "controller"
        out.append({"step": e["step"], "controller": str(name), "message": str(e["message"] or ""),
                    "reason": str(e["data"].get("reason", ""))})
    return out


def _timeline(ax, runs, found) -> None:
    rows = [(r, c) for r in runs for c in dict.fromkeys(d["controller"] for d in found.get(r.id, []))]
    number = 0
    for i, r in enumerate(runs):
        for d in found.get(r.id, []):
            number += 1
            y = rows.index((r, d["controller"]))
            step = d["step"] if d["step"] is not None else 0
            ax.plot([step], [y], marker="D", markersize=6, linestyle="none", color=style.style(i, 0, len(runs))["color"])
            if number <= MAX_LABELS:
                ax.annotate(str(number), (step, y), textcoords="offset points", xytext=(0, 7), ha="center",
                            fontsize=7)
    labels = [style.text(short(c if len(runs) == 1 else f"{r.label}: {c}")) for r, c in rows]
    ax.set_yticks(range(len(rows)), labels=labels)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.grid(axis="y", visible=False)


def _figure(runs, found):
    with_lr = [r for r in runs if r.has("lr")]
    n_rows = len({(r.id, d["controller"]) for r in runs for d in found.get(r.id, [])})
    fig, axes = style.figure(1, 2 if with_lr else 1, size=(7.0, (2.6 if with_lr else 0) + 0.9 + 0.35 * n_rows),
                             sharex=True, **({"gridspec_kw": {"height_ratios": [2.6, 0.9 + 0.35 * n_rows]}}
                                             if with_lr else {}))
    if with_lr:
        ax = axes[0]
        plotted = lines(ax, runs, [("lr", "learning rate")])
        for i, r in enumerate(runs):
            for d in found.get(r.id, []):
                if d["step"] is not None:
                    ax.axvline(d["step"], color=style.style(i, 0, len(runs))["color"], linestyle=":", linewidth=1)
        style.log_y_if_spans(ax, *plotted)
        ax.set_ylabel("learning rate")
        legend(ax, runs)
    _timeline(axes[-1], runs, found)
    style.shared_step_axes(axes)
    return fig


def _table(runs, found) -> Table:
    rows, number = [], 0
    for r in runs:
        for d in found.get(r.id, []):
            number += 1
            if number <= MAX_ROWS:
                rows.append([str(number)] + ([r.label] if len(runs) > 1 else []) +
                            [fmt(d["step"]), d["controller"], d["message"], d["reason"]])
    head = ["#"] + (["run"] if len(runs) > 1 else []) + ["step", "controller", "decision", "reason"]
    caption = f"The first {MAX_ROWS} of {number} decisions." if number > MAX_ROWS else ""
    return Table(head, rows, caption)


def controller_timeline(runs: Sequence[RunData]) -> Panel | None:
    found = {r.id: d for r in runs if (d := decisions(r))}
    if not found:
        return None
    n = sum(len(v) for v in found.values())
    p = Panel("controllers", "Controller decisions",
              f"{n} decision{'s' if n != 1 else ''} by the controllers that acted on training, each "
              "with the reason it gave. Numbers in the figure match the table.")
    p.add("timeline", "Decisions on a log step axis (dotted lines on the learning-rate curve).",
          _figure(runs, found))
    p.tables.append(_table(runs, found))
    return p

