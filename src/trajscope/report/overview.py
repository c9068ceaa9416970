"""The overview of a report: what ran, how it ended, and what it holds (plain-text rows; the HTML
writer escapes them). One run gives (field, value) rows; several runs one column per run."""

from __future__ import annotations

import datetime as dt
from typing import Sequence

from trajscope.report.data import RunData, flatten, fmt, natural_key, seconds

MAX_EVENTS = 100


def status_sentence(r: RunData) -> str:
    """What happened, in one sentence."""
    step = r.meta.get("status_step")
    step = r.last_step if step is None else step
    reason = r.meta.get("status_reason")
    planned = r.config.get("steps")
    if r.status == "finished":
        hit, target, (wall, _) = r.time_to_target(), r.target(), r.wall_s()
        s = f"Finished {r.last_step} steps" + (f" in {seconds(wall)}." if wall is not None else ".")
        if target is not None and r.has("val_metric"):
            s += (f" Reached the target {target:g} at step {hit[0]}." if hit
                  else f" Did not reach the target {target:g}.")
        return s
    if r.status == "diverged":
        return (f"Diverged at step {step}" + (f": {reason}" if reason else "") +
                ". Curves end there; everything recorded before it is shown.")
    if r.status == "crashed":
        return (f"Crashed at step {step}" + (f" of {planned}" if planned else "") + (f": {reason}" if reason else "") +
                f". The report shows what was recorded up to step {r.last_step}.")
    return f"Still running: recorded up to step {r.last_step}" + (f" of {planned}." if planned else ".")


def recorded_text(r: RunData) -> str:
    rec = r.recorded()
    snaps = ", ".join(f"{n} {k} snapshots" for k, n in rec["snapshots"].items()) or "no snapshots"
    text = (f"{rec['scalars']} scalars ({rec['values']} values), {snaps}, {rec['sketches']} sketches, "
            f"{rec['results']} analysis results")
    if not rec["results"] and (rec["snapshots"].get("params") or rec["sketches"]):
        text += " (run 'trajscope analyze' on it to add the trajectory panels)"
    elif not rec["snapshots"].get("params") and not rec["sketches"]:
        text += " (no trajectory was recorded, so the trajectory panels are absent)"
    return text


def _when(t: float | None) -> str:
    return "-" if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fields(r: RunData) -> dict[str, str]:
    """The overview rows of one run."""
    best, hit, target = r.best_metric(), r.time_to_target(), r.target()
    final = r.final()
    planned = r.config.get("steps")
    if hit:
        to_target = f"step {hit[0]}" + (f" ({seconds(hit[1])})" if hit[1] is not None else "")
    elif target is None or not best:
        to_target = "-"
    else:
        to_target = "not reached"
    wall, measured = r.wall_s()
    versions = r.meta.get("versions") or {}
    return {
        "run": r.label if r.label == r.id else f"{r.label} ({r.id})",
        "workload": r.workload or "-",
        "status": r.status + (f" at step {r.meta.get('status_step')}" if r.status in ("crashed", "diverged")
                              and r.meta.get("status_step") is not None else ""),
        "seed": fmt(r.run.seed),
        "steps": f"{r.last_step}" + (f" of {planned}" if planned is not None else ""),
        "wall time": seconds(wall) + ("" if measured or wall is None else " (from start to end time)"),
        "final validation metric": fmt(final.get("val_metric")),
        "final validation loss": fmt(final.get("val_loss")),
        "best validation metric": f"{fmt(best[1])} at step {best[0]}" if best else "-",
        "target": fmt(target),
        "time to target": to_target,
        "started": _when(r.meta.get("started_at") or r.meta.get("created_at")),
        "recorded": recorded_text(r),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()) or "-",
    }


def overview_rows(runs: Sequence[RunData]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): field | value for one run, field | run 1 | run 2 ... for several."""
    per_run = [fields(r) for r in runs]
    head = ["", "value"] if len(runs) == 1 else [""] + [r.label for r in runs]
    return head, [[k] + [f[k] for f in per_run] for k in per_run[0]]


def config_rows(runs: Sequence[RunData], keys: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """The flattened config (dotted keys), one value column per run; only ``keys`` if given."""
    flat = [flatten(r.config) for r in runs]
    keys = keys if keys is not None else sorted(set().union(*flat), key=natural_key)
    head = ["key", "value"] if len(runs) == 1 else ["key"] + [r.label for r in runs]
    return head, [[k] + [fmt(f.get(k)) for f in flat] for k in keys]


def event_rows(runs: Sequence[RunData]) -> tuple[list[str], list[list[str]], int]:
    """(header, rows, total) of the event logs (every kind), the first MAX_EVENTS rows."""
    rows = []
    for r in runs:
        for e in r.events.itertuples(index=False):
            step = "-" if e.step is None or e.step != e.step else str(int(e.step))
            rows.append(([r.label] if len(runs) > 1 else []) + [step, str(e.kind), str(e.message)])
    head = (["run"] if len(runs) > 1 else []) + ["step", "kind", "message"]
    return head, rows[:MAX_EVENTS], len(rows)
