"""All runs under a root: list them, and find one by id, unique id prefix or name."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from trajscope.errors import CorruptRunError, RunNotFoundError
from trajscope.store import paths


@dataclass(frozen=True)
class RunInfo:
    """One line of ``trajscope ls``. ``status`` is ``corrupt`` for a directory that cannot be read."""

    run_id: str
    name: str | None
    status: str
    workload: str | None
    steps: int | None
    created_at: float | None
    path: str
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def list_runs(root: str | os.PathLike | None = None) -> list[RunInfo]:
    """Every run directory under ``root`` (default ``./runs``), oldest first; unreadable ones as ``corrupt``."""
    from trajscope.store.run import Run

    root = Path(root) if root is not None else paths.default_root()
    if not root.is_dir():
        return []
    infos = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and paths.db_path(p).exists()):
        try:
            run = Run.open(d)
            try:
                infos.append(RunInfo(run.id, run.name, run.status, run.config.get("workload"),
                                     run.last_step(), run.meta.get("created_at"), str(d)))
            finally:
                run.close()
        except CorruptRunError as e:
            infos.append(RunInfo(d.name, None, "corrupt", None, None, None, str(d), str(e)))
    return sorted(infos, key=lambda i: (i.created_at or 0.0, i.run_id))


def resolve(ref: str, root: str | os.PathLike | None = None) -> Path:
    """The directory of the run that ``ref`` names: a run directory path, a run id, a unique prefix
    of one, or a name. Raises RunNotFoundError (no match, or an ambiguous one) in one line."""
    root = Path(root) if root is not None else paths.default_root()
    direct = Path(ref)
    if paths.is_run_dir(direct):
        return direct
    if paths.is_run_dir(root / ref):
        return root / ref
    infos = list_runs(root)
    by_name = [i for i in infos if i.name == ref]
    if len(by_name) == 1:
        return Path(by_name[0].path)
    matches = by_name or [i for i in infos if i.run_id.startswith(ref)]
    if not matches:
        raise RunNotFoundError(f"no run {ref!r} under {root} (give a run id, a unique prefix or a name; "
                               "'trajscope ls' lists them)")
    if len(matches) > 1:
        ids = ", ".join(i.run_id for i in matches[:5])
        raise RunNotFoundError(f"{ref!r} is ambiguous under {root}: matches {ids}")
    return Path(matches[0].path)


def open_run(ref: str, root: str | os.PathLike | None = None):
    """``Run.open(resolve(ref, root))``."""
    from trajscope.store.run import Run

    return Run.open(resolve(ref, root))
