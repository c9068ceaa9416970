"""Export a run to TensorBoard event files: every scalar, histograms of the snapshots, the config.

Tags: a scalar keeps its name (``loss``, ``sharpness/lambda_max``: TensorBoard groups by the part
before the slash); a snapshot tensor becomes the histogram ``<kind>/<tensor name>`` (kinds
``params`` and ``grads``) at its step; the config and the status are text (``run/config``,
``run/status``). Written with ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard``
package: extra ``report``); read back with TensorBoard's own ``EventAccumulator``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trajscope.store import Run

HISTOGRAM_KINDS = ("params", "grads")


def log_spaced(steps: list[int], n: int) -> list[int]:
    """At most ``n`` of ``steps`` (sorted), log-spaced by position so the dense early ones are kept;
    always the first and the last."""
    if n <= 0:
        return []
    if len(steps) <= n:
        return list(steps)
    idx = np.unique(np.round(np.geomspace(1, len(steps), n)).astype(np.int64) - 1)
    return [steps[i] for i in np.union1d(idx, [0, len(steps) - 1])]


def _writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises this when the tensorboard package is missing
        from trajscope.errors import UsageError

        raise UsageError(f"TensorBoard export needs the tensorboard package (pip install 'trajscope[report]'): {e}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("events.out.tfevents.*"):
        old.unlink()  # a re-export replaces the previous one instead of duplicating every point
    return SummaryWriter(log_dir=str(out_dir))


def _scalars(writer, run: Run) -> tuple[int, int]:
    """Write every recorded scalar (NULL/NaN, i.e. not recorded, is skipped); (points, tags)."""
    df = run.scalars()
    df = df[df["value"].notna()]
    for step, name, value in df.itertuples(index=False):
        writer.add_scalar(name, float(value), int(step))
    return len(df), int(df["name"].nunique())


def _histograms(writer, run: Run, max_steps: int) -> tuple[int, int]:
    """Histograms of the finite entries of each snapshot tensor; (histograms, snapshot steps)."""
    n_hist, n_steps = 0, 0
    for kind in (k for k in HISTOGRAM_KINDS if k in run.snapshot_kinds()):
        steps = log_spaced(run.snapshot_steps(kind), max_steps)
        n_steps += len(steps)
        for step in steps:
            for name, t in run.load_snapshot(step, kind).items():
                v = t.detach().to(torch.float32).flatten()
                v = v[torch.isfinite(v)]
                if v.numel():
                    writer.add_histogram(f"{kind}/{name}", v.numpy(), step)
                    n_hist += 1
    return n_hist, n_steps


def _text(writer, run: Run) -> None:
    meta = run.meta
    config = json.dumps({"config": run.config, "seed": run.seed}, indent=2, sort_keys=True)
    writer.add_text("run/config", "    " + config.replace("\n", "\n    "), 0)  # markdown code block
    status = f"{run.status}" + (f" at step {meta.get('status_step')}" if meta.get("status_step") is not None else "")
    if meta.get("status_reason"):
        status += f": {meta['status_reason']}"
    writer.add_text("run/status", status, run.last_step() or 0)


def export_tensorboard(ref: str | os.PathLike, root: str | os.PathLike | None = None,
                       out_dir: str | os.PathLike | None = None, *, histograms: bool = True,
                       max_histogram_steps: int = 64) -> dict[str, Any]:
    """Write the run ``ref`` (directory, id, unique prefix or name under ``root``) as TensorBoard
    event files in ``out_dir`` (default ``tensorboard/<run-id>``), replacing earlier event files there.

    ``histograms``: also the snapshots (params, grads) as histograms, at most
    ``max_histogram_steps`` snapshot steps per kind (log-spaced, first and last kept).
    Returns ``{"run_id", "out_dir", "files", "scalars" (points), "scalar_tags", "histograms",
    "histogram_steps"}``.
    """
    from trajscope.store.runs import resolve

    run = Run.open(resolve(str(ref), root))
    try:
        out = Path(out_dir) if out_dir is not None else Path("tensorboard") / run.id
        writer = _writer(out)
        try:
            points, tags = _scalars(writer, run)
            n_hist, n_steps = _histograms(writer, run, max_histogram_steps) if histograms else (0, 0)
            _text(writer, run)
        finally:
            writer.close()
        files = sorted(str(p) for p in out.glob("events.out.tfevents.*"))
        return {"run_id": run.id, "out_dir": str(out), "files": files, "scalars": points, "scalar_tags": tags,
                "histograms": n_hist, "histogram_steps": n_steps}
    finally:
        run.close()

