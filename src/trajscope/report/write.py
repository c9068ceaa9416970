"""``write_report``: one self-contained HTML file for one run, or several overlaid."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from trajscope.report import style
from trajscope.report.controllers import controller_timeline
from trajscope.report.curves import training_curves
from trajscope.report.data import RunData, label_runs
from trajscope.report.early import early_phase
from trajscope.report.landscape import landscape
from trajscope.report.maps import trajectory_maps
from trajscope.report.panel import Panel, PanelFn
from trajscope.report.pca import pca
from trajscope.report.probes import kernel, noise, sharpness, trace
from trajscope.report.regimes import regimes

# The panels in page order; each returns None where no run holds its data.
PANELS: tuple[PanelFn, ...] = (training_curves, early_phase, trajectory_maps, pca, sharpness, trace, noise,
                               kernel, regimes, landscape, controller_timeline)


def build_panels(runs: Sequence[RunData], panels: Sequence[PanelFn] = PANELS) -> list[Panel]:
    """Every panel that has data, in order (figures rendered to PNG in the report style)."""
    out = []
    with style.context():
        for fn in panels:
            p = fn(runs)
            if p:
                out.append(p)
    return out


def default_out(runs: Sequence[RunData]) -> Path:
    """``report-<id>.html`` (``report-<id1>-<id2>...html`` for a comparison) in the working directory."""
    ids = [r.id for r in runs]
    tag = "-".join(ids[:3]) + (f"-and-{len(ids) - 3}-more" if len(ids) > 3 else "")
    return Path(f"report-{tag}.html")


def save_figures(panels: Sequence[Panel], figures_dir: str | os.PathLike) -> list[Path]:
    """Write each figure alone as ``<panel>-<figure>.png``; return the paths."""
    d = Path(figures_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in panels:
        for f in p.figures:
            path = d / f"{p.key}-{f.key}.png"
            path.write_bytes(f.png)
            paths.append(path)
    return paths


def _analyze_missing(paths: Sequence[Path]) -> None:
    """Run ``measures.analyze`` (groups all and layers) on runs that have a trajectory but no analysis."""
    from trajscope import measures
    from trajscope.store import Run

    for path in paths:
        run = Run.open(path)
        try:
            needed = "analyze" not in run.result_names() and (run.snapshot_steps("params") or len(run.sketches()[0]))
            groups = ["all", "layers"] if run.snapshot_steps("params") else ["all"]
        finally:
            run.close()
        if needed:
            measures.analyze(path, groups=groups, save=True, progress=False)


def write_report(refs: Sequence[str | os.PathLike], root: str | os.PathLike | None = None,
                 out: str | os.PathLike | None = None, figures_dir: str | os.PathLike | None = None,
                 *, analyze: bool = False) -> Path:
    """Write the HTML report of the runs ``refs`` (directory, id, unique id prefix or name under
    ``root``); several runs are overlaid. Returns the path written.

    ``out``: the HTML file (default :func:`default_out`). ``figures_dir``: also save every figure
    there as a PNG. ``analyze``: first run the trajectory measures on runs that have a trajectory but
    no stored analysis (takes each such run's write lock).
    """
    from trajscope import __version__
    from trajscope.errors import UsageError
    from trajscope.report.html import page
    from trajscope.store.runs import resolve

    if not refs:
        raise UsageError("give at least one run to report on")
    paths = list(dict.fromkeys(resolve(str(ref), root).resolve() for ref in refs))
    if analyze:
        _analyze_missing(paths)
    runs = [RunData.load(p) for p in paths]
    try:
        differ = label_runs(runs)
        panels = build_panels(runs)
        html = page(runs, panels, __version__, differ)
        out = Path(out) if out is not None else default_out(runs)
    finally:
        for r in runs:
            r.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    if figures_dir is not None:
        save_figures(panels, figures_dir)
    return out
