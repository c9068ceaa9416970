"""The run store: one directory per run (see :mod:`trajscope.store.paths`)."""

from trajscope.store.run import Run, canonical_json, run_id_for
from trajscope.store.runs import RunInfo, list_runs, open_run, resolve

__all__ = ["Run", "RunInfo", "canonical_json", "list_runs", "open_run", "resolve", "run_id_for"]
