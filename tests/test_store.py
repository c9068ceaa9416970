import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from trajscope import runs
from trajscope.errors import CorruptRunError, RunExistsError, RunLockedError, RunNotFoundError
from trajscope.store import Run, list_runs, resolve, run_id_for
from trajscope.store.tensors import flatten_state, load_state, save_state, unflatten_state


def test_run_id_is_hash_of_canonical_config_and_seed():
    a = run_id_for({"lr": 0.1, "opt": {"b": 1, "a": 2}}, 0)
    assert a == run_id_for({"opt": {"a": 2, "b": 1}, "lr": 0.1}, 0)  # key order does not matter
    assert a != run_id_for({"lr": 0.1, "opt": {"b": 1, "a": 2}}, 1)
    assert a != run_id_for({"lr": 0.2, "opt": {"b": 1, "a": 2}}, 0)
    assert len(a) == 12 and int(a, 16) >= 0


def test_create_write_read_roundtrip(root):
    run = Run.create(root, {"lr": 0.1}, seed=3, name="first")
    assert run.status == "running" and run.writable
    run.log_scalars(0, {"loss": 2.0, "param_norm": 5.0})
    run.log_scalars(1, {"loss": 1.5})
    run.log_sketch(0, torch.arange(8, dtype=torch.float32), k=8, seed=0)
    run.log_sketch(1, torch.ones(8), k=8, seed=0)
    w = torch.randn(3, 4)
    run.save_snapshot(1, {"layer.weight": w, "layer.bias": torch.zeros(4)})
    run.log_event(1, "note", "hello", {"x": 1})
    run.close("finished")

    r = Run.open(root / run.id)
    assert r.status == "finished" and r.seed == 3 and r.config == {"lr": 0.1} and r.name == "first"
    meta = r.meta
    for key in ("versions", "host", "started_at", "ended_at", "created_at"):
        assert meta[key] is not None
    assert set(meta["versions"]) >= {"python", "torch", "trajscope"}
    df = r.scalars()
    assert list(df.columns) == ["step", "name", "value"] and len(df) == 3
    wide = r.scalars(wide=True)
    assert wide.loc[1, "loss"] == 1.5 and pd.isna(wide.loc[1, "param_norm"])
    steps, sk = r.sketches()
    assert steps.tolist() == [0, 1] and torch.equal(sk[0], torch.arange(8.0))
    snap = r.load_snapshot(1)
    assert torch.equal(snap["layer.weight"], w)
    assert r.snapshot_steps("params") == [1]
    ev = r.events()
    assert "note" in ev["kind"].tolist()
    assert r.last_step() == 1


def test_resolve_by_id_prefix_and_name(root):
    a = Run.create(root, {"x": 1}, name="alpha")
    a.close("finished")
    b = Run.create(root, {"x": 2})
    b.close("finished")
    assert resolve(a.id, root) == root / a.id
    assert resolve(a.id[:6], root) == root / a.id
    assert resolve("alpha", root) == root / a.id
    assert runs.open("alpha", root).id == a.id
    with pytest.raises(RunNotFoundError, match="no run"):
        resolve("zzzz", root)
    assert [i.run_id for i in runs.list(root)] == [a.id, b.id]
    with pytest.raises(RunExistsError, match="alpha"):
        Run.create(root, {"x": 3}, name="alpha")  # a name names one run


def test_existing_run_needs_resume_or_overwrite(root):
    r = Run.create(root, {"x": 1})
    r.log_scalars(0, {"loss": 1.0})
    r.close("finished")
    with pytest.raises(RunExistsError, match="already exists"):
        Run.create(root, {"x": 1})
    again = Run.create(root, {"x": 1}, exist_ok=True)
    assert again.scalars()["value"].tolist() == [1.0]
    again.close("finished")
    fresh = Run.create(root, {"x": 1}, overwrite=True)
    assert fresh.scalars().empty
    fresh.close("finished")


def test_second_writer_is_refused_in_process_and_across_processes(root):
    r = Run.create(root, {"x": 1})
    with pytest.raises(RunLockedError, match="another process"):
        Run.create(root, {"x": 1}, exist_ok=True)
    code = ("import sys; from trajscope.store import Run\n"
            "from trajscope.errors import RunLockedError\n"
            f"try:\n    Run.create({str(root)!r}, {{'x': 1}}, exist_ok=True)\n"
            "except RunLockedError as e:\n    print('refused:', e); sys.exit(7)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 7, p.stderr
    assert "being written by another process" in p.stdout
    # A reader in another process sees the live writer as running, not crashed.
    p = subprocess.run([sys.executable, "-c", f"from trajscope.store import Run; print(Run.open({str(r.path)!r}).status)"],
                       capture_output=True, text=True)
    assert p.stdout.strip() == "running"
    r.close("finished")


def test_running_run_without_writer_reads_as_crashed(root):
    code = (f"import os; from trajscope.store import Run\n"
            f"r = Run.create({str(root)!r}, {{'x': 1}})\n"
            "r.log_scalars(0, {'loss': 1.0}); r.commit()\n"
            "r.log_scalars(1, {'loss': 2.0})\n"  # never committed
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    (info,) = list_runs(root)
    assert info.status == "crashed"
    r = Run.open(info.path)
    assert r.scalars()["step"].tolist() == [0]


def test_missing_and_corrupt_snapshot_files_name_the_file(root):
    r = Run.create(root, {"x": 1})
    p1 = r.save_snapshot(1, {"w": torch.ones(10)})
    p2 = r.save_snapshot(2, {"w": torch.ones(10)})
    r.save_snapshot(3, {"w": torch.full((10,), 3.0)})
    r.close("finished")
    p1.unlink()
    p2.write_bytes(p2.read_bytes()[:20])
    r = Run.open(root / r.id)
    with pytest.raises(CorruptRunError, match=f"{p1.name}.*missing"):
        r.load_snapshot(1)
    with pytest.raises(CorruptRunError, match=f"{p2.name}.*corrupt"):
        r.load_snapshot(2)
    assert r.load_snapshot(3)["w"][0] == 3.0  # the rest of the run still reads
    assert r.status == "finished"


def test_corrupt_database_is_reported_and_listed(root):
    good = Run.create(root, {"x": 1})
    good.close("finished")
    bad = root / "deadbeef0000"
    bad.mkdir()
    (bad / "run.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CorruptRunError, match="run.db"):
        Run.open(bad)
    infos = {i.run_id: i for i in list_runs(root)}
    assert infos["deadbeef0000"].status == "corrupt" and infos[good.id].status == "finished"
    with pytest.raises(CorruptRunError, match="not a directory"):
        Run.open(root / "nothing")


def test_export_parquet_and_csv(root, tmp_path):
    r = Run.create(root, {"x": 1})
    for t in range(5):
        r.log_scalars(t, {"loss": 1.0 / (t + 1), "lr": 0.1})
    r.close("finished")
    r = Run.open(root / r.id)
    r.export(str(tmp_path / "s.parquet"), "parquet")
    r.export(str(tmp_path / "s.csv"), "csv")
    a = pd.read_parquet(tmp_path / "s.parquet")
    b = pd.read_csv(tmp_path / "s.csv")
    pd.testing.assert_frame_equal(a, r.scalars())
    pd.testing.assert_frame_equal(b, r.scalars(), check_dtype=False)
    r.export("memory://exported.csv", "csv")  # any fsspec URL
    import fsspec

    with fsspec.open("memory://exported.csv", "rt") as f:
        assert f.read().startswith("step,name,value")


def test_nested_state_roundtrip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "tuple": (1, 2.5, "a", None), "nested": [{"t": torch.arange(3)}]}
    skeleton, tensors = flatten_state(state)
    json.dumps(skeleton)  # the skeleton is plain JSON
    back = unflatten_state(skeleton, tensors)
    assert back["tuple"] == (1, 2.5, "a", None)
    save_state(tmp_path / "s.safetensors", state)
    loaded = load_state(tmp_path / "s.safetensors")
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["opt"])
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state_dict()["state"][0][k], opt.state_dict()["state"][0][k])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9)


def test_store_code_never_unpickles():
    src = Path(__file__).parents[1] / "src" / "trajscope" / "store"
    for f in src.glob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "torch.load" not in text, f


def test_temporary_files_are_never_indexed(root):
    r = Run.create(root, {"x": 1})
    r.save_snapshot(1, {"w": torch.ones(3)})
    # A leftover temporary file (as a kill mid-write leaves) is not a snapshot.
    (r.path / "snapshots" / "params-000000002.safetensors.tmp-123").write_bytes(b"partial")
    r.close("finished")
    assert Run.open(r.path).snapshot_steps() == [1]
    con = sqlite3.connect(r.path / "run.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_results_are_stored_in_a_finished_run_without_changing_it(root):
    r = Run.create(root, {"x": 1})
    r.log_scalars(0, {"loss": 1.0})
    r.close("finished")
    w = Run.open(r.path, write=True)
    with pytest.raises(RunLockedError):
        Run.open(r.path, write=True)  # one writer at a time
    w.save_result("mds/all", {"mds": 0.5, "series": [1.0, float("nan")]}, {"map": torch.eye(3)})
    w.save_result("plain", {"a": 1})
    w.close()
    back = Run.open(r.path)
    assert back.status == "finished"
    data, tensors = back.load_result("mds/all")
    assert data["mds"] == 0.5 and math.isnan(data["series"][1]) and torch.equal(tensors["map"], torch.eye(3))
    assert back.load_result("plain") == ({"a": 1}, {})
    assert back.result_names() == ["mds/all", "plain"]
    with pytest.raises(KeyError, match="no result"):
        back.load_result("nope")


def test_open_for_writing_marks_a_dead_running_run_crashed(root):
    code = (f"import os; from trajscope.store import Run\n"
            f"r = Run.create({str(root)!r}, {{'x': 1}})\n"
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    (d,) = [p for p in root.iterdir()]
    w = Run.open(d, write=True)
    assert w.meta["status"] == "crashed"
    w.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.uint8, torch.bool])
def test_snapshot_files_are_standard_safetensors(tmp_path, dtype):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from trajscope.store.tensors import save_tensors

    base = torch.randn(4, 6)
    tensors = {"w": (base * 10).to(dtype), "t.view": (base.t() * 3).to(dtype), "scalar": torch.tensor(1).to(dtype),
               "empty": torch.zeros(0, 3, dtype=dtype), "shared": (base[1] * 2).to(dtype)}
    save_tensors(tmp_path / "x.safetensors", tensors, {"note": "hi"})
    back = load_file(str(tmp_path / "x.safetensors"))  # the reference reader
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == dtype and torch.equal(back[k], v.contiguous()), k
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"note": "hi"}
