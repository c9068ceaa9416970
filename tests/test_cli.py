"""The command line as a user runs it: real subprocesses of the installed console script."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trajscope.store import Run

EXE = [sys.executable, "-m", "trajscope.cli"]
# One thread: these models are tiny, and two threads on a busy 2-core machine oversubscribe it.
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def cli(*args, root=None, check=True, timeout=300):
    argv = [*EXE, *args] + (["--root", str(root)] if root is not None else [])
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                       env=ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} exited {p.returncode}: {p.stderr}")
    return p


def test_run_json_ls_show_export(root, tmp_path):
    p = cli("run", "digits-mlp", "--steps", "30", "--eval-every", "10", "--lr", "0.003", "--name", "tiny",
            "--json", root=root)
    out = json.loads(p.stdout)
    assert {"run_id", "path", "status", "steps", "final"} <= set(out)
    assert out["status"] == "finished" and out["steps"] == 30 and 0 <= out["final"]["val_metric"] <= 1
    ls = json.loads(cli("ls", "--json", root=root).stdout)
    assert [r["run_id"] for r in ls["runs"]] == [out["run_id"]]
    for ref in (out["run_id"], out["run_id"][:5], "tiny"):
        show = json.loads(cli("show", ref, "--json", root=root).stdout)
        assert show["run_id"] == out["run_id"] and show["status"] == "finished"
        assert show["config"]["lr"] == 0.003 and show["sketches"] == 31
    human = cli("show", "tiny", root=root).stdout
    assert out["run_id"] in human and "finished" in human
    for fmt in ("parquet", "csv"):
        dest = tmp_path / f"s.{fmt}"
        e = json.loads(cli("export", "tiny", "--format", fmt, "--out", str(dest), "--json", root=root).stdout)
        assert dest.exists() and e["rows"] > 30 * 4
    assert "digits-mlp" in cli("workloads").stdout
    names = [w["name"] for w in json.loads(cli("workloads", "--json").stdout)["workloads"]]
    assert {"mnist1d-mlp", "mnist1d-cnn", "digits-mlp", "mnist5k-cnn", "modadd-mlp", "modadd-transformer",
            "cifar10-resnet20"} <= set(names)


@pytest.mark.parametrize("args,needle", [
    (["run", "imagenet"], "unknown workload 'imagenet'; valid choices: cifar10-resnet20"),
    (["run", "digits-mlp", "--optimizer", "lion"],
     "unknown optimizer 'lion'; valid choices: adam, adamw, muon, prodigy, schedulefree, sgd"),
    (["run", "digits-mlp", "--frobnicate", "3"], "no such option: --frobnicate; valid options: --batch-size"),
    (["run", "digits-mlp", "--record", "everything"], "unknown record preset 'everything'"),
    (["run", "digits-mlp", "--lr", "fast"], "--lr"),
    (["fly"], "No such command 'fly'; valid commands: analyze, demo, export"),
    (["show", "nosuchrun"], "no run 'nosuchrun'"),
    (["export", "x", "--format", "xlsx"], "unknown export format 'xlsx'"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(root, args, needle):
    p = cli(*args, root=root, check=False)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr + p.stdout


def test_missing_cifar_files_is_one_line(root, tmp_path):
    p = cli("run", "cifar10-resnet20", "--data-dir", str(tmp_path), "--steps", "1", root=root, check=False)
    assert p.returncode == 2 and "data_batch_1" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_nan_loss_exits_nonzero_with_run_marked_diverged(root):
    p = cli("run", "mnist1d-mlp", "--lr", "10000", "--steps", "50", "--json", root=root, check=False)
    assert p.returncode == 3, p.stderr
    out = json.loads(p.stdout)
    assert out["status"] == "diverged" and "Traceback" not in p.stderr
    r = Run.open(out["path"])
    assert r.status == "diverged" and r.meta["status_step"] == out["diverged_at"]
    assert sorted(set(r.scalars()["step"])) == list(range(out["diverged_at"] + 1))


def _committed_steps(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        n = con.execute("SELECT COUNT(DISTINCT step) FROM scalars").fetchone()[0]
        con.close()
        return n
    except sqlite3.Error:
        return 0


def test_kill_9_leaves_a_crashed_run_that_opens_and_resumes(root):
    args = [*EXE, "run", "mnist1d-mlp", "--steps", "400", "--eval-every", "50", "--root", str(root),
            "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=ENV)
    deadline = time.time() + 120
    db = None
    while time.time() < deadline:
        dbs = list(root.glob("*/run.db")) if root.exists() else []
        if dbs and _committed_steps(dbs[0]) > 60:  # past the step-40 checkpoint, inside dense snapshots
            db = dbs[0]
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    assert db is not None, "the run never committed 60 steps"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    run = Run.open(db.parent)
    assert run.status == "crashed"
    steps = sorted(set(run.scalars()["step"]))
    assert steps == list(range(len(steps))) and len(steps) > 60  # every committed step intact, no gaps
    for s in run.snapshot_steps("params"):  # every indexed snapshot is whole
        assert run.load_snapshot(s)
    ls = json.loads(cli("ls", "--json", root=root).stdout)
    assert ls["runs"][0]["status"] == "crashed"
    # Without --resume the crashed run is not silently overwritten.
    again = cli("run", "mnist1d-mlp", "--steps", "400", "--eval-every", "50", root=root, check=False)
    assert again.returncode != 0 and "crashed" in again.stderr
    out = json.loads(cli("run", "mnist1d-mlp", "--steps", "400", "--eval-every", "50", "--resume", "--json",
                         root=root).stdout)
    assert out["status"] == "finished" and out["steps"] == 400
    r = Run.open(out["path"])
    assert sorted(set(r.scalars()["step"])) == list(range(401))


def test_analyze_json_summary_per_group(root):
    out = json.loads(cli("run", "digits-mlp", "--steps", "20", "--eval-every", "10", "--json", root=root).stdout)
    p = cli("analyze", out["run_id"], "--group", "all", "--group", "layers", "--json", root=root)
    summary = json.loads(p.stdout)
    assert "all" in summary["groups"] and len(summary["groups"]) >= 3  # all + one per layer
    for g in summary["groups"].values():
        for key in ("mds", "mds_window", "effective_dim", "pca_components_90", "distance_from_init_final",
                    "sign_flip_fraction_final"):
            assert key in g, key
        assert 0 <= g["sign_flip_fraction_final"] <= 1 and g["pca_components_90"] >= 1
    assert "mds.theta:all" in Run.open(out["path"]).result_names()
    bad = cli("analyze", out["run_id"], "--group", "nosuch*", root=root, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_landscape_command_stores_a_plane(root):
    out = json.loads(cli("run", "digits-mlp", "--steps", "20", "--eval-every", "10", "--json", root=root).stdout)
    s = json.loads(cli("landscape", out["run_id"], "--plane", "pca", "--steps", "5", "--batch-size", "200", "--json",
                       root=root).stdout)
    assert s["plane"] == "pca" and s["steps"] == 5 and s["loss_min"] <= s["loss_center"] <= s["loss_max"]
    _, tensors = Run.open(out["path"]).load_result(s["result"])
    assert tensors["losses"].shape == (5, 5)
    bad = cli("landscape", out["run_id"], "--plane", "hessian", root=root, check=False)
    assert bad.returncode == 2 and "valid choices: pca, random" in bad.stderr
