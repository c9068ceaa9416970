"""``trajscope.runs.list(root)``, ``trajscope.runs.open(ref, root)``: the runs under a root."""

from trajscope.store.runs import RunInfo, list_runs, open_run, resolve

list = list_runs  # noqa: A001 - the public spelling is runs.list(root)
open = open_run  # noqa: A001

__all__ = ["RunInfo", "list", "open", "resolve"]
