"""The SQLite schema of a run and how it is opened.

WAL mode with ``synchronous=NORMAL``: a commit survives the death of the writing process (the
operating system still holds the WAL), readers never block the writer, and a killed process loses
at most its uncommitted transaction.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from trajscope.errors import CorruptRunError

SCHEMA_VERSION = 4  # 2: snapshots.byte_offset (snapshots packed into one file); 3: sketches.f32 + sketch_index;
# 4: sketches back in the database (schema 3 runs still read, resume and truncate)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scalars (
    step INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
    PRIMARY KEY (step, name)) WITHOUT ROWID;
-- sketches: one row per recorded step, its k float32 values as a BLOB
CREATE TABLE IF NOT EXISTS sketches (step INTEGER PRIMARY KEY, data BLOB NOT NULL);
-- sketch_index: schema 3 only (the values were rows of sketches.f32 at byte_offset); read, never written
CREATE TABLE IF NOT EXISTS sketch_index (step INTEGER PRIMARY KEY, byte_offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    step INTEGER NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL, nbytes INTEGER NOT NULL,
    byte_offset INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (step, kind)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER, time REAL NOT NULL,
    kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT);
CREATE TABLE IF NOT EXISTS results (
    name TEXT PRIMARY KEY, time REAL NOT NULL, data TEXT NOT NULL, tensors TEXT);
"""


def connect(path: Path, create: bool = False) -> sqlite3.Connection:
    """Open a run database; a missing or non-SQLite file raises CorruptRunError naming it.

    ``create`` creates the file and any table it lacks (a run written by an older version gains
    the newer tables when it is next opened for writing). A NEW file is set up with
    ``synchronous=OFF``: the switch to WAL and the schema cost six fsyncs (30-50 ms on a busy
    disk, a large part of a short run's recording cost) that only protect an empty database
    against an OS crash. The creator calls :func:`durable` after its first commit; a process that
    is killed loses nothing either way.
    """
    path = Path(path)
    if not create and not path.is_file():
        raise CorruptRunError(f"{path} is missing: not a trajscope run directory")
    fresh = create and not path.exists()
    try:
        con = sqlite3.connect(str(path), timeout=30.0, isolation_level="DEFERRED", check_same_thread=False)
        con.execute(f"PRAGMA synchronous={'OFF' if fresh else 'NORMAL'}")
        con.execute("PRAGMA journal_mode=WAL")
        if create:
            con.executescript(SCHEMA)
            if not has_byte_offsets(con):  # a run written before snapshots were packed
                con.execute("ALTER TABLE snapshots ADD COLUMN byte_offset INTEGER NOT NULL DEFAULT 0")
            con.commit()
        else:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            missing = {"meta", "scalars", "sketches", "snapshots", "events"} - tables
            if missing:
                raise CorruptRunError(f"{path} is not a trajscope run database (missing tables: {', '.join(sorted(missing))})")
    except sqlite3.DatabaseError as e:
        raise CorruptRunError(f"{path} is not a readable run database: {e}") from None
    return con


def has_byte_offsets(con: sqlite3.Connection) -> bool:
    """Whether the snapshot index has the ``byte_offset`` column (schema 2; older runs read as 0:
    every snapshot a file of its own)."""
    return any(row[1] == "byte_offset" for row in con.execute("PRAGMA table_info(snapshots)"))


def durable(con: sqlite3.Connection) -> None:
    """From now on every commit survives the death of the process and the WAL is synced at each
    checkpoint (``synchronous=NORMAL``), whatever :func:`connect` set up."""
    con.execute("PRAGMA synchronous=NORMAL")
