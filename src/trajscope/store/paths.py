"""Every file of a run directory is named here, and nowhere else.

::

    <root>/<run-id>/
        run.db                      SQLite (WAL): meta, scalars, sketches, snapshot index, events
        run.lock                    held (flock) by the one process that writes the run
        snapshots/<kind>-<step>.safetensors   one file per snapshot; kind: params, grads,
                                    optim, buffers, checkpoint
        results/<name>.safetensors  tensors of a stored analysis result (its JSON is in run.db)
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOT = "runs"
DB_NAME = "run.db"
LOCK_NAME = "run.lock"
SNAPSHOT_DIR = "snapshots"
RESULT_DIR = "results"
TMP_MARK = ".tmp-"


def default_root() -> Path:
    """The runs root: ``$TRAJSCOPE_ROOT`` if set, else ``./runs``."""
    return Path(os.environ.get("TRAJSCOPE_ROOT", DEFAULT_ROOT))


def run_dir(root: str | os.PathLike, run_id: str) -> Path:
    return Path(root) / run_id


def db_path(run_dir: Path) -> Path:
    return Path(run_dir) / DB_NAME


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def snapshot_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR


def snapshot_relpath(kind: str, step: int) -> str:
    """Path of a snapshot file relative to the run directory (what the index stores)."""
    return f"{SNAPSHOT_DIR}/{kind}-{step:09d}.safetensors"


def result_relpath(name: str) -> str:
    """Path of a result's tensor file relative to the run directory."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{RESULT_DIR}/{safe}.safetensors"


def temporary_path(final: Path) -> Path:
    """Where a file is written before it is renamed to ``final`` (never listed in the index)."""
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}")


def is_run_dir(path: Path) -> bool:
    return db_path(path).is_file()
