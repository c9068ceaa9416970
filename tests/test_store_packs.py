"""Small snapshots packed into one file per commit: readers, crash safety, resume, old runs; and,
with ``Run.pack_below_bytes = 0``, every snapshot a safetensors file of its own."""

import os
import sqlite3
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load

from trajscope.errors import CorruptRunError
from trajscope.measures.reader import read_header, read_pieces
from trajscope.store import Run
from trajscope.store.tensors import encode_tensors


@pytest.fixture(autouse=True)
def packed(monkeypatch):
    """The default (``Run.pack_below_bytes``, 1 MiB), whatever another test set."""
    monkeypatch.setattr(Run, "pack_below_bytes", 1 << 20)


def _snap(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"b.weight": torch.randn(3, 5, generator=g), "a.bias": torch.randn(5, generator=g),
            "c": torch.arange(4, dtype=torch.int64) * step}


def _write(run: Run, step: int, kind: str = "params") -> None:
    run.write_snapshot(step, encode_tensors(_snap(step)), kind)


def _write_steps(run: Run, steps, commit: bool = True) -> None:
    for step in steps:
        _write(run, step)
    if commit:
        run.commit()


def _files(run: Run) -> list[str]:
    return sorted(p.name for p in (run.path / "snapshots").iterdir())


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_small_snapshots_wait_for_the_commit_and_share_one_file(root):
    run = Run.create(root, {"x": 1})
    for step in range(5):
        _write(run, step)
    _write(run, 3, "grads")
    assert _files(run) == []  # nothing on disk before the commit
    run.commit()
    (pack,) = _files(run)
    assert pack == "pack-000000000-000000004.safetensors-pack"
    run.close("finished")

    r = Run.open(run.path)
    assert r.snapshot_steps() == [0, 1, 2, 3, 4] and r.snapshot_steps("grads") == [3]
    raw = (r.path / "snapshots" / pack).read_bytes()
    end = 0
    for step, kind in [(0, "params"), (1, "params"), (2, "params"), (3, "params"), (4, "params"), (3, "grads")]:
        path, start, size = r.snapshot_span(step, kind)
        assert path.name == pack and start == end  # one after another, in the order written
        end = start + size
        assert _same(r.load_snapshot(step, kind), _snap(step))  # keys in file order, like load_file
        theirs = load(raw[start:start + size])  # safetensors' own loader, on the range (its own key order)
        assert _same({k: theirs[k] for k in _snap(step)}, _snap(step)) and len(theirs) == 3
        # positioned reads of the measures see the same tensors
        fd = os.open(path, os.O_RDONLY)
        try:
            base, entries = read_header(fd, start, size)
        finally:
            os.close(fd)
        assert sorted(entries) == sorted(_snap(step))
        out = torch.empty(10)
        read_pieces(path, [("b.weight", 1, 3, 0, 10)], out, None, start, size)
        assert torch.equal(out, _snap(step)["b.weight"][1:3].reshape(-1))
    assert end == len(raw)


def test_a_full_pack_is_written_before_the_commit(root):
    run = Run.create(root, {"x": 1})
    run.pack_max_bytes = 2 * len(encode_tensors(_snap(0)))
    for step in range(5):
        _write(run, step)
    assert _files(run) == ["pack-000000000-000000001.safetensors-pack",
                           "pack-000000002-000000003.safetensors-pack"]
    assert run.snapshot_steps() == [0, 1, 2, 3, 4]  # reading flushes the rest
    assert len(_files(run)) == 3
    run.close("finished")
    assert all(_same(Run.open(run.path).load_snapshot(s), _snap(s)) for s in range(5))


def _killed_after_a_commit(root, pack_below_bytes: int):
    """A writer that commits steps 1 and 2 (scalar and snapshot each), records step 3 and is
    killed: the run as it is left, opened."""
    code = ("import os, torch\nfrom trajscope.store import Run\nfrom trajscope.store.tensors import encode_tensors\n"
            f"r = Run.create({str(root)!r}, {{'x': 1}}); r.pack_below_bytes = {pack_below_bytes}\n"
            "for s in (1, 2):\n"
            "    r.log_scalars(s, {'loss': 1.0}); r.write_snapshot(s, encode_tensors({'w': torch.full((4,), float(s))}))\n"
            "r.commit()\n"
            "r.log_scalars(3, {'loss': 1.0}); r.write_snapshot(3, encode_tensors({'w': torch.zeros(4)}))\n"
            "os.kill(os.getpid(), 9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    (d,) = list(root.iterdir())
    r = Run.open(d)
    assert r.status == "crashed" and r.snapshot_steps() == [1, 2] and r.scalars()["step"].tolist() == [1, 2]
    assert [float(r.load_snapshot(s)["w"][0]) for s in (1, 2)] == [1.0, 2.0]
    return d


def test_kill_before_the_commit_loses_only_the_uncommitted_snapshots(root):
    d = _killed_after_a_commit(root, 1 << 20)
    assert [p.name for p in (d / "snapshots").iterdir()] == ["pack-000000001-000000002.safetensors-pack"]


def test_truncate_after_keeps_a_pack_that_holds_earlier_steps(root):
    run = Run.create(root, {"x": 1})
    _write_steps(run, range(6))
    run.truncate_after(3)
    assert run.snapshot_steps() == [0, 1, 2, 3] and _files(run) == ["pack-000000000-000000005.safetensors-pack"]
    _write_steps(run, range(4, 8))  # the resumed run records them again
    assert _files(run) == ["pack-000000000-000000005.safetensors-pack", "pack-000000004-000000007.safetensors-pack"]
    run.truncate_after(3)  # the second pack holds nothing earlier: it goes
    assert _files(run) == ["pack-000000000-000000005.safetensors-pack"]
    _write_steps(run, range(4, 8), commit=False)
    run.truncate_after(-1)  # nothing left: every pack goes
    assert run.snapshot_steps() == [] and _files(run) == []
    _write_steps(run, range(2), commit=False)
    run.close("finished")
    assert Run.open(run.path).snapshot_steps() == [0, 1]


def test_resumed_range_gets_its_own_pack_name(root):
    run = Run.create(root, {"x": 1})
    _write_steps(run, range(4))
    run.truncate_after(1)
    _write_steps(run, range(2, 4))
    run.truncate_after(0)  # the first pack still holds step 0, so its name is taken
    _write_steps(run, range(4), commit=False)
    run.close("finished")
    names = _files(run)
    assert "pack-000000000-000000003.safetensors-pack" in names and "pack-000000000-000000003-1.safetensors-pack" in names
    r = Run.open(run.path)
    assert all(_same(r.load_snapshot(s), _snap(s)) for s in range(4))


def test_corrupt_or_missing_pack_names_the_file_and_the_snapshot(root):
    run = Run.create(root, {"x": 1})
    for step in range(3):
        _write(run, step)
    run.close("finished")
    r = Run.open(run.path)
    path, start, size = r.snapshot_span(2)
    path.write_bytes(path.read_bytes()[:start + size // 2])
    assert _same(r.load_snapshot(1), _snap(1))  # the snapshots before the damage still read
    with pytest.raises(CorruptRunError, match=rf"{path.name} is corrupt: the params snapshot of step 2"):
        r.load_snapshot(2)
    raw = bytearray(path.read_bytes())
    raw[r.snapshot_span(1)[1] + 8:r.snapshot_span(1)[1] + 12] = b"\xff\xfe{["  # garbage in step 1's header
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptRunError, match=rf"{path.name} is corrupt: the params snapshot of step 1") as e:
        r.load_snapshot(1)
    assert "\n" not in str(e.value)
    path.unlink()
    with pytest.raises(CorruptRunError, match=rf"{path.name} is missing"):
        r.load_snapshot(0)


def test_runs_from_before_packs_still_read_and_resume(root):
    run = Run.create(root, {"x": 1})
    run.save_snapshot(1, _snap(1))  # a file of its own
    run.close("finished")
    con = sqlite3.connect(run.path / "run.db")
    con.execute("ALTER TABLE snapshots DROP COLUMN byte_offset")  # the index as an older version wrote it
    con.commit()
    con.close()
    r = Run.open(run.path)
    assert _same(r.load_snapshot(1), _snap(1)) and r.snapshot_span(1)[1:] == (0, None)
    r.close()
    w = Run.create(root, {"x": 1}, exist_ok=True)  # reopened for writing: the column is added
    _write(w, 2)
    w.close("finished")
    r = Run.open(run.path)
    assert r.snapshot_steps() == [1, 2] and all(_same(r.load_snapshot(s), _snap(s)) for s in (1, 2))


def test_without_packs_every_snapshot_is_a_safetensors_file_of_its_own(root, monkeypatch):
    monkeypatch.setattr(Run, "pack_below_bytes", 0)
    run = Run.create(root, {"x": 1})
    _write_steps(run, range(3), commit=False)
    run.close("finished")
    assert _files(run) == [f"params-{s:09d}.safetensors" for s in range(3)]
    for s in range(3):
        with open(run.path / "snapshots" / f"params-{s:09d}.safetensors", "rb") as f:
            plain = load(f.read())  # a plain safetensors file
        assert sorted(plain) == sorted(_snap(s)) and all(torch.equal(plain[k], _snap(s)[k]) for k in plain)
    r = Run.open(run.path)
    assert r.snapshot_steps() == [0, 1, 2] and _same(r.load_snapshot(2), _snap(2))


def test_a_commit_lists_the_snapshot_files_of_the_steps_it_commits(root):
    """Without packs, files are written on the writer thread; a commit waits for those under
    1 MiB, so after a kill every committed step has its snapshot (a later one is at most an
    unlisted file)."""
    _killed_after_a_commit(root, 0)


def test_truncate_after_removes_snapshot_files_still_being_written(root, monkeypatch):
    monkeypatch.setattr(Run, "pack_below_bytes", 0)
    run = Run.create(root, {"x": 1})
    _write_steps(run, range(6), commit=False)  # on the writer thread, none indexed yet
    run.truncate_after(2)
    run.commit()
    assert run.snapshot_steps() == [0, 1, 2]
    assert _files(run) == [f"params-{s:09d}.safetensors" for s in range(3)]
    run.close("finished")
