"""Every file of a run directory is named here, and nowhere else.

::

    <root>/<run-id>/
        run.db                      SQLite (WAL): meta, scalars, sketches (a row per step),
                                    snapshot index, events
        sketches.f32                schema 3 runs only: their sketches as float32 rows (read)
        run.lock                    held (flock) by the one process that writes the run
        snapshots/<kind>-<step>.safetensors   a snapshot in a file of its own; kind: params,
                                    grads, optim, buffers, checkpoint
        snapshots/pack-<first>-<last>[-<n>].safetensors-pack   small snapshots of steps
                                    first..last, whole safetensors files one after another
                                    (the index gives each one's byte range)
        results/<name>.safetensors  tensors of a stored analysis result (its JSON is in run.db)
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOT = "runs"
DB_NAME = "run.db"
LOCK_NAME = "run.lock"
SKETCH_NAME = "sketches.f32"
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


def sketch_path(run_dir: Path) -> Path:
    return Path(run_dir) / SKETCH_NAME


def snapshot_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR


def snapshot_relpath(kind: str, step: int) -> str:
    """Path of a snapshot file relative to the run directory (what the index stores)."""
    return f"{SNAPSHOT_DIR}/{kind}-{step:09d}.safetensors"


PACK_PREFIX = "pack-"
PACK_SUFFIX = ".safetensors-pack"


def pack_relpath(first: int, last: int, n: int = 0) -> str:
    """Path of a snapshot pack relative to the run directory; ``n`` > 0 tells apart packs of the
    same steps (a re-recorded range after a resume)."""
    return f"{SNAPSHOT_DIR}/{PACK_PREFIX}{first:09d}-{last:09d}{f'-{n}' if n else ''}{PACK_SUFFIX}"


def is_pack(relpath: str) -> bool:
    return relpath.endswith(PACK_SUFFIX)


def result_relpath(name: str) -> str:
    """Path of a result's tensor file relative to the run directory."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{RESULT_DIR}/{safe}.safetensors"


def temporary_path(final: Path) -> Path:
    """Where a file is written before it is renamed to ``final`` (never listed in the index)."""
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}")


def is_run_dir(path: Path) -> bool:
    return db_path(path).is_file()
