"""Sketches live in ``sketches.f32`` (float32 rows, appended at each commit) with their byte offsets
in the database: what is logged reads back bit for bit, in step order, through kills, resumes,
truncation, runs of the older layout (rows in the database) and a file that lost its tail."""

import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

from trajscope.store import Run
from trajscope.store import paths


def rows(n, k=8, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_sketches_are_file_rows_indexed_by_offset(root):
    run = Run.create(root, {"x": 1})
    a, b = rows(3), rows(2, seed=1)
    run.log_sketches([0, 1, 2], a, k=8, seed=5)
    run.commit()
    run.log_sketch(4, b[0], k=8, seed=5)
    run.log_sketches([3], b[1:])  # steps need not come in order
    run.log_sketch(1, b[0])  # replaces step 1
    run.close("finished")
    # The database holds (step, byte offset) only; the bytes are the file's, one row after another.
    con = sqlite3.connect(run.path / "run.db")
    assert con.execute("SELECT COUNT(*) FROM sketches").fetchone()[0] == 0
    index = dict(con.execute("SELECT step, byte_offset FROM sketch_index"))
    raw = np.fromfile(paths.sketch_path(run.path), dtype=np.float32)
    assert raw.size == 6 * 8 and index == {0: 0, 1: 5 * 32, 2: 64, 3: 4 * 32, 4: 3 * 32}
    steps, sk = Run.open(run.path).sketches()
    assert steps.tolist() == [0, 1, 2, 3, 4] and sk.dtype == torch.float32
    assert torch.equal(sk, torch.stack([a[0], b[0], a[2], b[1], b[0]]))
    assert Run.open(run.path).meta["sketch"] == {"k": 8, "seed": 5}


def test_a_sketch_of_another_width_is_refused(root):
    run = Run.create(root, {"x": 1})
    run.log_sketch(0, torch.ones(8))
    with pytest.raises(ValueError, match="k=8"):
        run.log_sketch(1, torch.ones(4))
    with pytest.raises(ValueError, match="k=8"):
        run.log_sketches([1, 2], torch.ones(3, 8))
    run.close("finished")
    assert Run.open(run.path).sketches()[0].tolist() == [0]


def test_a_killed_writer_loses_only_uncommitted_sketches_and_resume_appends_after_its_bytes(root):
    code = (f"import os, torch; from trajscope.store import Run\n"
            f"r = Run.create({str(root)!r}, {{'x': 1}})\n"
            "r.log_sketches([0, 1], torch.arange(16.).reshape(2, 8)); r.commit()\n"
            "r.log_sketches([2], torch.full((1, 8), 7.)); r._flush()\n"  # file written, index not committed
            "os.write(r._sketch_fd, b'half a row')\n"  # and a torn write after it
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    (d,) = list(root.iterdir())
    steps, sk = Run.open(d).sketches()
    assert steps.tolist() == [0, 1] and torch.equal(sk, torch.arange(16.).reshape(2, 8))
    w = Run.create(root, {"x": 1}, exist_ok=True)
    w.log_sketches([2, 3], torch.full((2, 8), 3.))
    w.close("finished")
    steps, sk = Run.open(d).sketches()
    assert steps.tolist() == [0, 1, 2, 3] and torch.equal(sk[2:], torch.full((2, 8), 3.))


def test_truncate_after_forgets_later_sketches_in_both_layouts(root):
    run = Run.create(root, {"x": 1})
    run.log_sketches([0, 1, 2, 3], rows(4))
    run.commit()
    run._con.execute("INSERT INTO sketches (step, data) VALUES (?, ?)", (9, np.ones(8, np.float32).tobytes()))
    run.truncate_after(1)
    run.log_sketch(2, torch.zeros(8))
    run.close("finished")
    steps, sk = Run.open(run.path).sketches()
    assert steps.tolist() == [0, 1, 2] and torch.equal(sk[:2], rows(4)[:2]) and not sk[2].any()


def test_a_run_with_sketches_in_the_database_reads_and_resumes(root):
    """Schema 2 kept each sketch as a BLOB in the ``sketches`` table: it still reads, and a resumed
    run's new sketches (in the file) join them, a re-recorded step taking the new row."""
    run = Run.create(root, {"x": 1})
    run._set_meta(sketch={"k": 8, "seed": 0})
    old = rows(3)
    run._con.executemany("INSERT INTO sketches (step, data) VALUES (?, ?)",
                         [(t, old[t].numpy().tobytes()) for t in range(3)])
    run._con.execute("DROP TABLE sketch_index")
    run.close("finished")
    assert torch.equal(Run.open(run.path).sketches()[1], old)  # read-only: no sketch_index table
    w = Run.create(root, {"x": 1}, exist_ok=True)  # opening for writing adds the table
    w.log_sketches([2, 3], rows(2, seed=1))
    w.close("finished")
    steps, sk = Run.open(run.path).sketches()
    assert steps.tolist() == [0, 1, 2, 3] and torch.equal(sk, torch.cat([old[:2], rows(2, seed=1)]))


def test_a_sketch_file_that_lost_its_tail_reads_the_rows_it_has(root):
    run = Run.create(root, {"x": 1})
    run.log_sketches([0, 1, 2], rows(3))
    run.close("finished")
    path = paths.sketch_path(run.path)
    os.truncate(path, 2 * 32 + 5)  # as after a power failure: the file is not synced
    with pytest.warns(RuntimeWarning, match="sketches of 1 steps"):
        steps, sk = Run.open(run.path).sketches()
    assert steps.tolist() == [0, 1] and torch.equal(sk, rows(3)[:2])
    path.unlink()
    with pytest.warns(RuntimeWarning, match="from step 0"):
        assert Run.open(run.path).sketches()[0].tolist() == []
