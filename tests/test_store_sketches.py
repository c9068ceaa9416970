"""Sketches live in the run's database, one row per recorded step (its k float32 values as a
BLOB): what is logged reads back bit for bit, in step order, through kills, resumes, truncation,
background checkpoints, and runs of schema 3 (values in ``sketches.f32``, offsets in
``sketch_index``), which still read, resume and truncate."""

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


def schema3_run(root, values: torch.Tensor):
    """A finished run laid out as schema 3 wrote it: the values as rows of ``sketches.f32``
    (here in reverse step order, as a resumed run could leave them), their offsets indexed."""
    run = Run.create(root, {"x": 1})
    run._set_meta(sketch={"k": values.shape[1], "seed": 0}, schema=3)
    n, row = values.shape[0], values.shape[1] * 4
    values.flip(0).numpy().tofile(paths.sketch_path(run.path))
    run._con.executemany("INSERT INTO sketch_index (step, byte_offset) VALUES (?, ?)",
                         [(t, (n - 1 - t) * row) for t in range(n)])
    run.close("finished")
    return run


def test_sketches_are_database_rows_one_per_step(root):
    run = Run.create(root, {"x": 1})
    a, b = rows(3), rows(2, seed=1)
    run.log_sketches([0, 1, 2], a, k=8, seed=5)
    run.commit()
    run.log_sketch(4, b[0], k=8, seed=5)
    run.log_sketches([3], b[1:])  # steps need not come in order
    run.log_sketch(1, b[0])  # replaces step 1
    run.close("finished")
    con = sqlite3.connect(run.path / "run.db")
    stored = dict(con.execute("SELECT step, data FROM sketches"))
    assert sorted(stored) == [0, 1, 2, 3, 4] and all(len(v) == 8 * 4 for v in stored.values())
    assert np.array_equal(np.frombuffer(stored[1], np.float32), b[0].numpy())
    assert not paths.sketch_path(run.path).exists()
    assert not os.path.exists(str(run.path / "run.db") + "-wal") or os.path.getsize(str(run.path / "run.db") + "-wal") == 0
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


def test_a_killed_writer_loses_only_uncommitted_sketches_and_a_resume_goes_on(root):
    code = (f"import os, torch; from trajscope.store import Run\n"
            f"r = Run.create({str(root)!r}, {{'x': 1}})\n"
            "r.checkpoint_min_bytes = 1  # a background checkpoint after each commit\n"
            "r.log_sketches([0, 1], torch.arange(16.).reshape(2, 8)); r.commit()\n"
            "r._ckpt_future.result()\n"
            "r.log_sketches([2], torch.full((1, 8), 7.)); r._flush()\n"  # in the transaction, not committed
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


def test_commits_fold_the_wal_in_the_background_and_readers_see_every_row(root):
    run = Run.create(root, {"x": 1})
    run.checkpoint_min_bytes = 64 * 1024 * 4  # 64 rows of k=1024
    db = run.path / "run.db"
    size0 = os.path.getsize(db)
    data = rows(200, k=1024)
    run.log_sketches(list(range(10)), data[:10])
    run.commit()
    assert run._ckpt_future is None  # 40 KB: below the threshold, nothing folded yet
    assert os.path.getsize(db) == size0  # the rows are in the WAL only
    run.log_sketches(list(range(10, 200)), data[10:])
    run.commit()
    run._ckpt_future.result()
    assert os.path.getsize(db) >= size0 + data.numel() * 4  # folded into the database file
    reader = Run.open(run.path)
    assert torch.equal(reader.sketches()[1], data)  # while the writer still holds the run
    reader.close()
    run.log_sketch(200, torch.ones(1024))
    run.close("finished")
    steps, sk = Run.open(run.path).sketches()
    assert steps.tolist() == list(range(201)) and torch.equal(sk[:200], data) and bool((sk[200] == 1).all())


def test_truncate_after_forgets_later_sketches_in_both_layouts(root):
    run = schema3_run(root, rows(4))
    w = Run.create(root, {"x": 1}, exist_ok=True)
    w.log_sketches([4, 5], rows(2, seed=1))
    w.commit()
    w.truncate_after(1)  # drops index rows 2, 3 and table rows 4, 5
    w.log_sketch(2, torch.zeros(8))
    w.close("finished")
    steps, sk = Run.open(run.path).sketches()
    assert steps.tolist() == [0, 1, 2] and torch.equal(sk[:2], rows(4)[:2]) and not sk[2].any()


def test_a_schema3_run_reads_and_resumes_a_rerecorded_step_taking_the_new_row(root):
    run = schema3_run(root, rows(3))
    steps, sk = Run.open(run.path).sketches()
    assert steps.tolist() == [0, 1, 2] and torch.equal(sk, rows(3))
    w = Run.create(root, {"x": 1}, exist_ok=True)
    w.log_sketches([2, 3], rows(2, seed=1))  # step 2 again (a resume from step 1)
    w.close("finished")
    steps, sk = Run.open(run.path).sketches()
    assert steps.tolist() == [0, 1, 2, 3] and torch.equal(sk, torch.cat([rows(3)[:2], rows(2, seed=1)]))
    con = sqlite3.connect(run.path / "run.db")
    assert [t for (t,) in con.execute("SELECT step FROM sketch_index ORDER BY step")] == [0, 1]


def test_a_schema3_sketch_file_that_lost_its_tail_reads_the_rows_it_has(root):
    run = schema3_run(root, rows(3))
    path = paths.sketch_path(run.path)
    # rows are stored in reverse: steps 2, 1, 0; cut into step 0's row
    os.truncate(path, 2 * 32 + 5)
    with pytest.warns(RuntimeWarning, match="sketches of 1 steps"):
        steps, sk = Run.open(run.path).sketches()
    assert steps.tolist() == [1, 2] and torch.equal(sk, rows(3)[1:])
    path.unlink()
    with pytest.warns(RuntimeWarning, match="from step 0"):
        assert Run.open(run.path).sketches()[0].tolist() == []
