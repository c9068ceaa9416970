"""A run on disk: ``Run.create`` to write one, ``Run.open`` to read one.

One process writes a run (it holds an exclusive ``flock`` on ``run.lock`` for as long as the run is
open for writing); any number read it. A run whose database says ``running`` but whose lock nobody
holds was killed: it reads as ``crashed``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from trajscope.errors import CorruptRunError, RunExistsError, RunLockedError
from trajscope.store import paths
from trajscope.store.db import SCHEMA_VERSION, connect, durable, has_byte_offsets
from trajscope.store.tensors import (encode_tensors, load_tensors, load_tensors_range, save_state, save_tensors,
                                     state_from, write_atomic)

STATUSES = ("running", "finished", "crashed", "diverged", "stopped")  # stopped: a callback asked, resumable


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed into a run id."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def run_id_for(config: Mapping[str, Any], seed: int) -> str:
    """12 hex digits of the SHA-256 of the canonical config plus seed."""
    digest = hashlib.sha256(canonical_json({"config": config, "seed": seed}).encode()).hexdigest()
    return digest[:12]


def _as_dict(config) -> dict:
    if config is None:
        return {}
    if hasattr(config, "model_dump"):  # a pydantic model
        return config.model_dump(mode="json")
    return json.loads(canonical_json(dict(config)))  # checks it is JSON-serializable


def _versions() -> dict[str, str]:
    from trajscope import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "trajscope": __version__}


class _Lock:
    """An exclusive, non-blocking flock on ``run.lock``; released by the OS if the process dies."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def is_held(path: Path) -> bool:
        """True if some open file description holds the lock (this process's included)."""
        if not path.exists():
            return False
        probe = _Lock(path)
        if probe.acquire():
            probe.release()
            return False
        return True

    @staticmethod
    def holder(path: Path) -> str:
        try:
            return path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"


class Run:
    """A run directory. Use :meth:`create` (to write) or :meth:`open` (to read)."""

    # Snapshots under this many bytes wait for the next commit and share one pack file; larger
    # ones (all of them with 0) are safetensors files of their own, written on the writer thread.
    pack_below_bytes = 1 << 20
    pack_max_bytes = 32 << 20  # a pack of smaller snapshots is written once it holds this many bytes
    commit_wait_bytes = 1 << 20  # a commit waits for background snapshot files under this size
    checkpoint_min_bytes = 256 << 10  # a commit after this many sketch bytes starts a background checkpoint

    def __init__(self, path: Path, con: sqlite3.Connection, lock: _Lock | None):
        self.path = Path(path)
        self._con = con
        self._lock = lock
        self._meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
        self._last_commit = time.monotonic()
        self._writer = None  # a one-thread pool for background snapshot writes
        self._pending: list[tuple[Any, int, str, str, int]] = []  # (future, step, kind, relpath, bytes)
        # Rows queued for the next commit (one executemany each), since per-step inserts dominate
        # the recorder's cost on small models; readers of this object flush them first.
        self._scalar_rows: list[tuple[int, str, float]] = []
        self._sketch_rows: list[tuple[list[int], np.ndarray]] = []  # (steps, their (n, k) float32 rows)
        # Schema 3 kept sketch values in sketches.f32 (index rows in sketch_index); a step written
        # again now (a resume) must leave that index, or the reader would take the old row.
        self._legacy_index = self._has_table("sketch_index") and con.execute(
            "SELECT 1 FROM sketch_index LIMIT 1").fetchone() is not None
        # Background WAL checkpoints (see _checkpoint_soon): bytes committed since the last one.
        self._unfolded = 0
        self._ckpt_pool = None
        self._ckpt_future = None
        self._ckpt_con: sqlite3.Connection | None = None
        self._snapshot_rows: list[tuple[int, str, str, int, int]] = []  # in files already whole on disk
        # Small snapshots wait here (step, kind, bytes of the file) and are written together, one
        # pack file per commit: creating a file costs more than writing 50 kB (see write_snapshot).
        self._pack: list[tuple[int, str, list, int]] = []  # (step, kind, parts of the file, its size)
        self._pack_bytes = 0
        self._offsets = has_byte_offsets(con)  # False: a run from before packs (read-only)
        # Called first at every flush (commit, close, reads): a writer that keeps rows of its own
        # (the Recorder's pending steps) hands them over, so whoever commits or closes the run
        # commits them too.
        self.flush_hooks: list = []

    # ---------------------------------------------------------------- creating and opening
    @classmethod
    def create(cls, root: str | os.PathLike | None = None, config=None, seed: int = 0, name: str | None = None,
               *, exist_ok: bool = False, overwrite: bool = False) -> "Run":
        """Create the run for ``config`` + ``seed`` under ``root`` and open it for writing.

        The id is :func:`run_id_for` (config, seed); ``name`` is an alias. If the run exists:
        ``exist_ok`` reopens it for writing (to resume), ``overwrite`` deletes it first, otherwise
        :class:`RunExistsError`. A run another process is writing raises :class:`RunLockedError`.
        """
        root = Path(root) if root is not None else paths.default_root()
        config = _as_dict(config)
        run_id = run_id_for(config, seed)
        path = paths.run_dir(root, run_id)
        if name is not None:
            _check_name_free(root, name, run_id)
        if paths.is_run_dir(path):
            if _Lock.is_held(paths.lock_path(path)):
                raise RunLockedError(f"run {run_id} is being written by another process "
                                     f"(pid/host {_Lock.holder(paths.lock_path(path))})")
            if overwrite:
                shutil.rmtree(path)
            elif not exist_ok:
                status = cls.open(path).status
                raise RunExistsError(f"run {run_id} already exists at {path} (status {status}); "
                                     "resume it or pass overwrite to start over")
        path.mkdir(parents=True, exist_ok=True)
        paths.snapshot_dir(path).mkdir(exist_ok=True)
        lock = _Lock(paths.lock_path(path))
        if not lock.acquire():
            raise RunLockedError(f"run {run_id} is being written by another process")
        fresh = not paths.is_run_dir(path)
        con = connect(paths.db_path(path), create=True)
        run = cls(path, con, lock)
        now = time.time()
        if fresh or "run_id" not in run._meta:
            run._set_meta(run_id=run_id, name=name, config=config, seed=seed, schema=SCHEMA_VERSION,
                          versions=_versions(), host=socket.gethostname(), pid=os.getpid(),
                          created_at=now, started_at=now, ended_at=None, status="running",
                          status_step=None, status_reason=None)
            run.log_event(None, "created", f"run {run_id} created")
        else:
            run._remove_temporaries()
            run._set_meta(status="running", pid=os.getpid(), host=socket.gethostname(), ended_at=None,
                          status_step=None, status_reason=None, resumed_at=now,
                          **({"name": name} if name is not None else {}))
            run.log_event(None, "reopened", f"run {run_id} reopened for writing")
        run.commit()
        durable(con)
        return run

    @classmethod
    def open(cls, path: str | os.PathLike, write: bool = False) -> "Run":
        """Open a run directory. Runs no code from the directory (no pickle).

        ``write=True`` takes the run's write lock (RunLockedError if another process holds it)
        without changing its status, e.g. to store analysis results in a finished run.
        """
        path = Path(path)
        if not path.is_dir():
            raise CorruptRunError(f"{path} is not a directory")
        con = connect(paths.db_path(path))
        lock = None
        if write:
            lock = _Lock(paths.lock_path(path))
            if not lock.acquire():
                con.close()
                raise RunLockedError(f"run at {path} is being written by another process "
                                     f"(pid/host {_Lock.holder(paths.lock_path(path))})")
            con.close()
            con = connect(paths.db_path(path), create=True)  # adds tables newer than the run
        run = cls(path, con, lock)
        if "run_id" not in run._meta:
            run.close()
            raise CorruptRunError(f"{paths.db_path(path)} has no run metadata")
        if write and run._meta.get("status") == "running":
            # Nobody else holds the lock, so the writer that left it "running" is gone.
            run.set_status("crashed", reason="writer died (detected on open)")
        return run

    def close(self, status: str | None = None, step: int | None = None, reason: str | None = None) -> None:
        """Commit, optionally set the final status, and release the write lock."""
        if self._con is None:
            return
        if self.writable:
            self._drain(wait=True)
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            if status is not None:
                self.set_status(status, step=step, reason=reason)
            self.commit(checkpoint=False)
            self._stop_checkpoints()
            # Fold the WAL into the database so the directory is one file again.
            self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._con.close()
        self._con = None
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.writable and exc is not None and self.status == "running":
            self.close("crashed", reason=f"{exc_type.__name__}: {exc}")
        else:
            self.close("finished" if self.writable and self.status == "running" else None)

    def __repr__(self) -> str:
        return f"Run({self.id!r}, status={self.status!r}, path='{self.path}')"

    # ---------------------------------------------------------------- metadata
    @property
    def writable(self) -> bool:
        return self._lock is not None and self._lock.fd is not None

    @property
    def meta(self) -> dict[str, Any]:
        """All metadata (a copy): run_id, name, config, seed, versions, host, times, status..."""
        return dict(self._meta)

    @property
    def id(self) -> str:
        return self._meta["run_id"]

    @property
    def name(self) -> str | None:
        return self._meta.get("name")

    @property
    def config(self) -> dict[str, Any]:
        return self._meta.get("config", {})

    @property
    def seed(self) -> int:
        return self._meta.get("seed", 0)

    @property
    def status(self) -> str:
        """running, finished, crashed or diverged; ``running`` with no live writer reads as crashed."""
        status = self._meta.get("status", "crashed")
        if status == "running" and not self.writable and not _Lock.is_held(paths.lock_path(self.path)):
            return "crashed"
        return status

    def _set_meta(self, **items: Any) -> None:
        self._require_writable()
        self._con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                              [(k, json.dumps(v)) for k, v in items.items()])
        self._meta.update(items)

    def set_meta(self, **items: Any) -> None:
        """Store extra JSON-serializable metadata (e.g. ``final`` metrics)."""
        self._set_meta(**items)

    def set_status(self, status: str, step: int | None = None, reason: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        ended = None if status == "running" else time.time()
        self._set_meta(status=status, status_step=step, status_reason=reason, ended_at=ended)
        self.log_event(step, "status", f"status {status}" + (f": {reason}" if reason else ""))
        self.commit()

    # ---------------------------------------------------------------- writing
    def _require_writable(self) -> None:
        if not self.writable:
            raise RunLockedError(f"run {self._meta.get('run_id', self.path)} is open read-only")

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Record scalars of one step (long format); a value for an existing (step, name) replaces it."""
        self._require_writable()
        step = int(step)
        self._scalar_rows.extend((step, k, float(v)) for k, v in values.items())

    def log_scalar_rows(self, rows: list[tuple[int, str, float]]) -> None:
        """Record ``(step, name, value)`` rows (int, str, float: not converted), as
        :meth:`log_scalars` would; a later row of the same (step, name) replaces an earlier one."""
        self._require_writable()
        self._scalar_rows.extend(rows)

    def log_sketch(self, step: int, sketch: torch.Tensor, k: int | None = None, seed: int | None = None) -> None:
        """Record the (k,) float32 sketch of the parameter vector at ``step``."""
        self.log_sketches([step], sketch.reshape(1, -1), k=k, seed=seed)

    def log_sketches(self, steps: list[int], sketches: torch.Tensor, k: int | None = None,
                     seed: int | None = None) -> None:
        """Record the (n, k) float32 sketches of ``steps`` (n of them), one row each; every sketch
        of a run has the same k. A sketch for a step that has one replaces it."""
        self._require_writable()
        data = sketches.detach().to("cpu", torch.float32).numpy().copy()  # a copy the caller cannot change
        if "sketch" not in self._meta:
            self._set_meta(sketch={"k": int(data.shape[1]) if k is None else k, "seed": seed})
        width = self._meta["sketch"]["k"]
        if data.ndim != 2 or data.shape[1] != width or data.shape[0] != len(steps):
            raise ValueError(f"run {self.id} keeps sketches of k={width} values, one per step; got shape "
                             f"{tuple(data.shape)} for {len(steps)} steps")
        self._sketch_rows.append(([int(t) for t in steps], data))

    def save_snapshot(self, step: int, tensors: Mapping[str, torch.Tensor], kind: str = "params",
                      background: bool = False) -> Path | None:
        """Write named tensors as the ``kind`` snapshot of ``step`` (atomic file, then index row);
        return the file.

        ``background``: copy the tensors now and write the file on a background thread, or, under
        :attr:`pack_below_bytes`, into the pack of the next commit (None is returned; see
        :meth:`write_snapshot`); the index row is added at the first commit after the file is in
        place (so a snapshot is never listed before it is whole; a process killed in between
        leaves it unlisted).
        """
        self._require_writable()
        data = encode_tensors(tensors) if background else None
        if data is None:
            rel = paths.snapshot_relpath(kind, int(step))
            self._index(step, kind, rel, save_tensors(self.path / rel, tensors))
            return self.path / rel
        return self.write_snapshot(step, data, kind)

    def write_snapshot(self, step: int, data, kind: str = "params", copy: bool = True) -> Path | None:
        """Write the bytes of a whole safetensors file (e.g. from ``store.tensors.encode_tensors``;
        or a list of bytes-like parts, e.g. a header and a tensor's buffer, which are read before
        this returns) as the ``kind`` snapshot of ``step``, on the background thread, indexed as
        :meth:`save_snapshot` with ``background=True`` says, and return its path.

        Files under :attr:`pack_below_bytes` (1 MiB; 0: none) are copied and kept until the next
        commit instead (or until :attr:`pack_max_bytes` wait), which writes them one after
        another into one pack file (temporary name, rename, then the index rows with each one's
        byte range); None is returned. Creating a file (~0.1-0.3 ms here) costs more than
        writing a small model's snapshot: one file per snapshot cost +1-1.5% of a 2-process DDP
        step of mnist1d-cnn on 2 cores (no core free for the writer thread), none measurable in
        one process. A process killed before the commit loses them, as it loses the scalars of
        those steps.

        ``copy=False``: the parts are kept as they are, not copied (the caller hands them over and
        never changes them)."""
        self._require_writable()
        parts = list(data) if isinstance(data, (list, tuple)) else [data]
        nbytes = sum(memoryview(p).nbytes for p in parts)
        if nbytes < self.pack_below_bytes:
            if copy:
                parts = [b"".join(parts)]  # a copy the caller cannot change
            self._pack.append((int(step), kind, parts, nbytes))
            self._pack_bytes += nbytes
            if self._pack_bytes >= self.pack_max_bytes:
                self._write_pack()
            return None
        rel = paths.snapshot_relpath(kind, int(step))
        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trajscope-writer")
        if copy:
            data = data if isinstance(data, bytes) else b"".join(parts)  # a copy the caller cannot change
        self._pending.append((self._writer.submit(write_atomic, self.path / rel, data), int(step), kind, rel, nbytes))
        return self.path / rel

    def _write_pack(self) -> None:
        """Write the waiting small snapshots as one pack file and queue their index rows."""
        if not self._pack:
            return
        steps = [step for step, _, _, _ in self._pack]
        n, rel = 0, paths.pack_relpath(min(steps), max(steps))
        while os.path.exists(self.path / rel):  # a pack of the same steps from before a resume
            n += 1
            rel = paths.pack_relpath(min(steps), max(steps), n)
        write_atomic(self.path / rel, [part for _, _, parts, _ in self._pack for part in parts])
        offset = 0
        for step, kind, _, nbytes in self._pack:
            self._snapshot_rows.append((step, kind, rel, nbytes, offset))
            offset += nbytes
        self._pack, self._pack_bytes = [], 0

    def _drain(self, wait: bool) -> None:
        """Index the background snapshot files that are written: all of them if ``wait``, else
        those done and those under :attr:`commit_wait_bytes` (waited for: a commit then lists the
        snapshots of the steps it commits; only a large file may be listed a commit later)."""
        keep = []
        for fut, step, kind, rel, nbytes in self._pending:
            if wait or nbytes < self.commit_wait_bytes or fut.done():
                nbytes = fut.result()  # an I/O error surfaces here
                self._con.execute("INSERT OR REPLACE INTO snapshots (step, kind, path, nbytes) VALUES (?, ?, ?, ?)",
                                  (step, kind, rel, nbytes))
            else:
                keep.append((fut, step, kind, rel, nbytes))
        self._pending = keep

    def save_state(self, step: int, state: Any, kind: str = "checkpoint") -> Path:
        """Write a nested state (checkpoint, optimizer state) as the ``kind`` snapshot of ``step``."""
        self._require_writable()
        rel = paths.snapshot_relpath(kind, int(step))
        nbytes = save_state(self.path / rel, state)
        self._index(step, kind, rel, nbytes)
        return self.path / rel

    def _index(self, step: int, kind: str, rel: str, nbytes: int) -> None:
        self._con.execute("INSERT OR REPLACE INTO snapshots (step, kind, path, nbytes) VALUES (?, ?, ?, ?)",
                          (int(step), kind, rel, nbytes))
        self.commit()

    def log_event(self, step: int | None, kind: str, message: str, data: Any = None) -> None:
        self._require_writable()
        self._con.execute("INSERT INTO events (step, time, kind, message, data) VALUES (?, ?, ?, ?, ?)",
                          (step, time.time(), kind, message, None if data is None else json.dumps(data)))

    def _flush(self) -> None:
        """Write the waiting pack and the queued scalar, sketch and snapshot rows into the current
        transaction."""
        for hook in list(self.flush_hooks):
            hook()
        self._write_pack()
        if self._scalar_rows:
            self._con.executemany("INSERT OR REPLACE INTO scalars (step, name, value) VALUES (?, ?, ?)",
                                  self._scalar_rows)
            self._scalar_rows = []
        if self._sketch_rows:
            self._write_sketches()
        if self._snapshot_rows:
            self._con.executemany("INSERT OR REPLACE INTO snapshots (step, kind, path, nbytes, byte_offset) "
                                  "VALUES (?, ?, ?, ?, ?)", self._snapshot_rows)
            self._snapshot_rows = []

    def _write_sketches(self) -> None:
        """Queue the sketches into the transaction: one row per step, its k float32 values as a
        BLOB (native byte order, little-endian on every platform torch supports)."""
        rows = [(step, data[i].tobytes()) for steps, data in self._sketch_rows for i, step in enumerate(steps)]
        self._sketch_rows = []
        if self._legacy_index:
            self._con.executemany("DELETE FROM sketch_index WHERE step = ?", [(t,) for t, _ in rows])
        self._con.executemany("INSERT OR REPLACE INTO sketches (step, data) VALUES (?, ?)", rows)
        self._unfolded += sum(len(b) for _, b in rows)

    def commit(self, checkpoint: bool = True) -> None:
        self._flush()
        if self._pending:
            self._drain(wait=False)
        self._con.commit()
        self._last_commit = time.monotonic()
        if checkpoint and self._unfolded >= self.checkpoint_min_bytes:
            self._checkpoint_soon()

    def _checkpoint_soon(self) -> None:
        """Fold the committed WAL into the database on a background thread (a PASSIVE checkpoint
        on a connection of its own), unless one is still running.

        A checkpoint syncs the WAL and then the database (``synchronous=NORMAL``); its cost is
        mostly waiting for the disk, which a thread of its own spends while training goes on
        instead of all of it at :meth:`close`, which then folds only what came after the last one.
        A checkpoint is SQLite's own operation: a process killed during one loses nothing."""
        if self._ckpt_future is not None and not self._ckpt_future.done():
            return
        # A fold that failed (e.g. a full disk) changed nothing stored: the next one, or the one at
        # close, folds what it left, and an error there is raised by close.
        if self._ckpt_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._ckpt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trajscope-checkpoint")
        self._unfolded = 0
        self._ckpt_future = self._ckpt_pool.submit(self._checkpoint_passive)

    def _checkpoint_passive(self) -> None:
        if self._ckpt_con is None:
            self._ckpt_con = sqlite3.connect(str(paths.db_path(self.path)), timeout=30.0,
                                             isolation_level=None, check_same_thread=False)
            self._ckpt_con.execute("PRAGMA synchronous=NORMAL")
        self._ckpt_con.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _stop_checkpoints(self) -> None:
        """Wait for a background checkpoint and close its connection (never the last one: the
        run's own connection is still open, so closing it folds nothing)."""
        if self._ckpt_pool is None:
            return
        try:
            if self._ckpt_future is not None:
                self._ckpt_future.exception()  # wait; a failed background fold changes nothing stored
        finally:
            self._ckpt_pool.shutdown(wait=True)
            if self._ckpt_con is not None:
                self._ckpt_con.close()
            self._ckpt_pool, self._ckpt_future, self._ckpt_con = None, None, None

    def commit_due(self, every_s: float) -> bool:
        """Whether at least ``every_s`` seconds passed since the last commit (0: always)."""
        return every_s <= 0 or time.monotonic() - self._last_commit >= every_s

    def maybe_commit(self, every_s: float) -> None:
        """Commit if :meth:`commit_due` (``every_s``)."""
        if self.commit_due(every_s):
            self.commit()

    def truncate_after(self, step: int) -> None:
        """Forget everything recorded after ``step`` (used when resuming from a checkpoint): scalars,
        sketches, snapshots and the controller decisions (events of kind ``controller``) of steps
        after it, which describe a trajectory the resumed run replaces. The rest of the event log
        (status changes, "resumed") is the run's history and stays."""
        self._require_writable()
        self._flush()
        self._drain(wait=True)  # a file still being written is indexed now, so that it goes too
        self._con.execute("DELETE FROM events WHERE kind = 'controller' AND step > ?", (step,))
        self._con.execute("DELETE FROM scalars WHERE step > ?", (step,))
        self._con.execute("DELETE FROM sketches WHERE step > ?", (step,))
        self._con.execute("DELETE FROM sketch_index WHERE step > ?", (step,))
        gone = {rel for (rel,) in self._con.execute("SELECT path FROM snapshots WHERE step > ?", (step,))}
        self._con.execute("DELETE FROM snapshots WHERE step > ?", (step,))
        kept = {rel for (rel,) in self._con.execute("SELECT DISTINCT path FROM snapshots")}
        for rel in gone - kept:  # a pack that still holds earlier steps stays
            (self.path / rel).unlink(missing_ok=True)
        self.commit()

    def _remove_temporaries(self) -> None:
        for f in paths.snapshot_dir(self.path).glob(f"*{paths.TMP_MARK}*"):
            f.unlink(missing_ok=True)

    # ---------------------------------------------------------------- reading
    def scalars(self, names: Iterable[str] | None = None, wide: bool = False) -> pd.DataFrame:
        """Scalars as a DataFrame: long (columns step, name, value) or ``wide`` (index step, a column per name)."""
        self._flush()
        query, args = "SELECT step, name, value FROM scalars", ()
        if names is not None:
            names = list(names)
            query += f" WHERE name IN ({','.join('?' * len(names))})"
            args = tuple(names)
        df = pd.read_sql_query(query + " ORDER BY step, name", self._con, params=args)
        if wide:
            return df.pivot(index="step", columns="name", values="value")
        return df

    def scalar_names(self) -> list[str]:
        self._flush()
        return [r[0] for r in self._con.execute("SELECT DISTINCT name FROM scalars ORDER BY name")]

    def last_step(self) -> int | None:
        """The largest step with a recorded scalar, or None."""
        self._flush()
        return self._con.execute("SELECT MAX(step) FROM scalars").fetchone()[0]

    def sketches(self) -> tuple[np.ndarray, torch.Tensor]:
        """(steps (T,), sketches (T, k) float32) in step order."""
        self._flush()
        k = self._meta.get("sketch", {}).get("k", 0)
        rows = {step: np.frombuffer(data, dtype=np.float32)
                for step, data in self._con.execute("SELECT step, data FROM sketches")}  # schema <= 2
        if self._has_table("sketch_index"):
            index = self._con.execute("SELECT step, byte_offset FROM sketch_index ORDER BY step").fetchall()
            if index:
                rows.update(self._sketch_file_rows(index, k))
        if not rows:
            return np.zeros(0, dtype=np.int64), torch.zeros(0, k)
        steps = np.array(sorted(rows), dtype=np.int64)
        return steps, torch.from_numpy(np.stack([rows[t] for t in steps.tolist()]))

    def _sketch_file_rows(self, index: list[tuple[int, int]], k: int) -> dict[int, np.ndarray]:
        """{step: (k,) float32} of the index rows, read from ``sketches.f32``. Rows past its end
        (the file lost its tail in a power failure: it is not synced) are left out, with a warning."""
        path = paths.sketch_path(self.path)
        data = np.fromfile(path, dtype=np.uint8) if path.exists() else np.zeros(0, dtype=np.uint8)
        steps = np.array([t for t, _ in index], dtype=np.int64)
        starts = np.array([o for _, o in index], dtype=np.int64)
        whole = starts + 4 * k <= data.size
        if not whole.all():
            import warnings

            warnings.warn(f"{path} ends before the sketches of {int((~whole).sum())} steps (from step "
                          f"{int(steps[~whole][0])}); they are left out", RuntimeWarning, stacklevel=3)
            steps, starts = steps[whole], starts[whole]
        block = data[starts[:, None] + np.arange(4 * k)].view(np.float32).reshape(len(steps), k)
        return dict(zip(steps.tolist(), block))

    def snapshot_steps(self, kind: str = "params") -> list[int]:
        self._flush()
        return [r[0] for r in self._con.execute(
            "SELECT step FROM snapshots WHERE kind = ? ORDER BY step", (kind,))]

    def snapshot_kinds(self) -> list[str]:
        self._flush()
        return [r[0] for r in self._con.execute("SELECT DISTINCT kind FROM snapshots ORDER BY kind")]

    def snapshot_path(self, step: int, kind: str = "params") -> Path:
        """The file that holds a snapshot: its own, or a pack (see :meth:`snapshot_span`). It may
        be missing or corrupt: :meth:`load_snapshot` checks."""
        return self.snapshot_span(step, kind)[0]

    def snapshot_span(self, step: int, kind: str = "params") -> tuple[Path, int, int | None]:
        """(file, byte offset, size in bytes or None for the whole file) of a snapshot: the bytes
        of one safetensors file, which is either a file of its own (offset 0, None) or one of the
        files one after another in a pack. KeyError if there is no such snapshot."""
        step = int(step)
        self._flush()
        offset = "byte_offset" if self._offsets else "0"
        row = self._con.execute(f"SELECT path, nbytes, {offset} FROM snapshots WHERE step = ? AND kind = ?",
                                (step, kind)).fetchone()
        if row is None:
            raise KeyError(f"run {self.id} has no {kind} snapshot at step {step}")
        rel, nbytes, start = row
        return self.path / rel, int(start), (int(nbytes) if paths.is_pack(rel) else None)

    def _load(self, step: int, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        path, start, nbytes = self.snapshot_span(step, kind)
        if nbytes is None:
            return load_tensors(path)
        return load_tensors_range(path, start, nbytes, f"the {kind} snapshot of step {int(step)}")

    def load_snapshot(self, step: int, kind: str = "params") -> dict[str, torch.Tensor]:
        """The named tensors of a snapshot; a missing or corrupt file raises CorruptRunError naming it."""
        return self._load(step, kind)[0]

    def load_state(self, step: int, kind: str = "checkpoint") -> Any:
        """A nested state (checkpoint, optimizer state) saved by :meth:`save_state`."""
        return state_from(*self._load(step, kind), self.snapshot_path(step, kind))

    def save_result(self, name: str, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Store an analysis result: JSON-serializable ``data`` and optional named ``tensors``.

        Saving under an existing name replaces it. Tensors go to ``results/<name>.safetensors``.
        """
        self._require_writable()
        rel = None
        if tensors:
            rel = paths.result_relpath(name)
            save_tensors(self.path / rel, tensors)
        self._con.execute("INSERT OR REPLACE INTO results (name, time, data, tensors) VALUES (?, ?, ?, ?)",
                          (name, time.time(), json.dumps(dict(data), sort_keys=True), rel))
        self.commit()

    def result_names(self) -> list[str]:
        if not self._has_table("results"):
            return []
        return [r[0] for r in self._con.execute("SELECT name FROM results ORDER BY name")]

    def load_result(self, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(data, tensors) of a stored result; KeyError if there is none of that name."""
        row = None
        if self._has_table("results"):
            row = self._con.execute("SELECT data, tensors FROM results WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyError(f"run {self.id} has no result {name!r}")
        tensors = load_tensors(self.path / row[1])[0] if row[1] else {}
        return json.loads(row[0]), tensors

    def _has_table(self, table: str) -> bool:
        return self._con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                                 (table,)).fetchone() is not None

    def events(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT step, time, kind, message, data FROM events ORDER BY id", self._con)

    def export(self, out: str, fmt: str = "parquet") -> str:
        """Write the scalars (long format) to ``out`` (any fsspec URL) as parquet or csv; return ``out``."""
        import fsspec

        df = self.scalars()
        with fsspec.open(out, "wb") as f:
            if fmt == "parquet":
                df.to_parquet(f, index=False)
            elif fmt == "csv":
                f.write(df.to_csv(index=False).encode())
            else:
                raise ValueError(f"unknown export format {fmt!r}")
        return out


def _check_name_free(root: Path, name: str, run_id: str) -> None:
    from trajscope.store.runs import list_runs

    for info in list_runs(root):
        if info.name == name and info.run_id != run_id:
            raise RunExistsError(f"name {name!r} already names run {info.run_id}; choose another name")
