"""What a report reads from a run: metadata, scalars, events and stored results, plus the numbers
the overview derives from them (best metric, time to target, what was recorded).

Time to target: the first step whose ``val_metric`` is >= the target (the run's ``target`` meta,
else the workload's ``target``), with the wall time at that step when the run logged a ``wall_s``
scalar there.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from trajscope.store import Run


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layer2`` before ``layer10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config as dotted keys (``record.snapshots``); lists and dicts-in-lists as JSON text."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
    return out


def fmt(v: Any, digits: int = 4) -> str:
    """A value as short text: floats with ``digits`` significant digits, None as a dash."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


@dataclass
class RunData:
    """One run opened read-only for a report; ``label`` names it in legends and tables."""

    run: Run
    scalars: pd.DataFrame  # wide: index step, one column per scalar name
    events: pd.DataFrame  # step, time, kind, message, data
    label: str = ""
    legend: str = ""
    _results: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunData":
        run = Run.open(path)
        rd = cls(run, run.scalars(wide=True).sort_index(), run.events())
        rd.label = rd.legend = run.name or run.id
        return rd

    def close(self) -> None:
        self.run.close()

    # ------------------------------------------------------------ metadata
    @property
    def id(self) -> str:
        return self.run.id

    @property
    def meta(self) -> dict[str, Any]:
        return self.run.meta

    @property
    def config(self) -> dict[str, Any]:
        return self.run.config

    @property
    def workload(self) -> str | None:
        return self.config.get("workload")

    @property
    def status(self) -> str:
        return self.run.status

    @property
    def last_step(self) -> int:
        return int(self.scalars.index.max()) if len(self.scalars) else 0

    def wall_s(self) -> tuple[float | None, bool]:
        """(wall seconds, measured): the trainer's ``wall_s``, else end minus start time (measured False)."""
        if self.meta.get("wall_s") is not None:
            return float(self.meta["wall_s"]), True
        start, end = self.meta.get("started_at"), self.meta.get("ended_at")
        return (end - start if start is not None and end is not None else None), False

    def target(self) -> float | None:
        if self.meta.get("target") is not None:
            return float(self.meta["target"])
        try:
            from trajscope import workloads

            return float(workloads.get(self.workload).target)
        except Exception:  # an unknown or custom workload has no target
            return None

    # ------------------------------------------------------------ scalars
    def has(self, name: str) -> bool:
        return name in self.scalars.columns and self.scalars[name].notna().any()

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a scalar, finite values only."""
        if name not in self.scalars.columns:
            return np.zeros(0, np.int64), np.zeros(0)
        s = self.scalars[name]
        s = s[np.isfinite(s.to_numpy(dtype=float, na_value=np.nan))]
        return s.index.to_numpy(dtype=np.int64), s.to_numpy(dtype=float)

    def names(self, prefix: str) -> list[str]:
        """Scalar names under ``prefix/`` that hold a value, in natural order."""
        return sorted((c for c in self.scalars.columns if c.startswith(prefix + "/") and self.has(c)),
                      key=natural_key)

    def best_metric(self) -> tuple[int, float] | None:
        steps, v = self.series("val_metric")
        if not len(v):
            return None
        i = int(np.argmax(v))
        return int(steps[i]), float(v[i])

    def time_to_target(self) -> tuple[int, float | None] | None:
        """(first step with val_metric >= target, wall seconds there or None); None if never."""
        target = self.target()
        steps, v = self.series("val_metric")
        hit = np.nonzero(v >= target)[0] if target is not None else []
        if not len(hit):
            return None
        step = int(steps[hit[0]])
        wall = self.scalars["wall_s"].get(step) if "wall_s" in self.scalars.columns else None
        return step, (None if wall is None or not np.isfinite(wall) else float(wall))

    def final(self) -> dict[str, float]:
        final = self.meta.get("final")
        if final:
            return final
        out = {}
        for k in ("val_loss", "val_metric"):
            _, v = self.series(k)
            if len(v):
                out[k] = float(v[-1])
        return out

    # ------------------------------------------------------------ results and events
    def result_names(self, kind: str) -> list[str]:
        """Stored result names that start with ``kind`` (e.g. ``early_statistics:``, ``landscape``)."""
        return [n for n in self.run.result_names() if n.startswith(kind)]

    def groups(self, kind: str) -> list[str]:
        """Groups that have a ``<kind>:<group>`` result: ``all`` first, then in natural order."""
        gs = [n.split(":", 1)[1] for n in self.result_names(kind + ":")]
        return sorted(gs, key=lambda g: (g != "all", natural_key(g)))

    def result(self, name: str) -> dict[str, Any]:
        """A stored result as one dict: its JSON fields plus its tensors as numpy arrays."""
        if name not in self._results:
            data, tensors = self.run.load_result(name)
            self._results[name] = {**data, **{k: t.numpy() for k, t in tensors.items()}}
        return self._results[name]

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        """Events of ``kind`` in order (:func:`events_of`)."""
        return events_of(self.events, kind)

    def recorded(self) -> dict[str, Any]:
        """What the run holds: scalar names and values, snapshots per kind, sketches, results."""
        n_values = int(self.scalars.notna().to_numpy().sum())
        snaps = {k: len(self.run.snapshot_steps(k)) for k in self.run.snapshot_kinds()}
        return {"scalars": int(self.scalars.shape[1]), "values": n_values, "snapshots": snaps,
                "sketches": len(self.run.sketches()[0]), "results": len(self.run.result_names())}


def events_of(events: pd.DataFrame, kind: str) -> list[dict[str, Any]]:
    """The rows of ``events`` (``Run.events()``) of ``kind`` in order, each a dict with ``step``
    (None outside a step), ``time``, ``message`` and ``data`` parsed from JSON (``{}`` if none)."""
    out = []
    for row in events[events["kind"] == kind].itertuples(index=False):
        try:
            data = json.loads(row.data) if isinstance(row.data, str) else {}
        except json.JSONDecodeError:
            data = {"raw": row.data}
        step = None if row.step is None or pd.isna(row.step) else int(row.step)
        out.append({"step": step, "time": row.time, "message": row.message,
                    "data": data if isinstance(data, dict) else {"value": data}})
    return out


def label_runs(runs: list[RunData]) -> list[str]:
    """Give each run a unique ``label`` and, for a comparison, a ``legend`` with the config values
    that differ between the runs; return those differing keys."""
    labels = [r.run.name or r.id for r in runs]
    for r, lab in zip(runs, labels):
        r.label = lab if labels.count(lab) == 1 else f"{lab} ({r.id})"
        r.legend = r.label
    if len(runs) < 2:
        return []
    flat = [flatten(r.config) | {"seed": r.run.seed} for r in runs]
    keys = sorted(set().union(*flat), key=natural_key)
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]
    for r, f in zip(runs, flat):
        diffs = ", ".join(f"{k}={fmt(f.get(k))[:30]}" for k in differ)
        r.legend = f"{r.label}: {diffs}" if diffs else r.label
    return differ
