"""The ray executor: a local Ray instance with 2 CPUs runs a 4-run sweep (one run fails: CIFAR-10
without its data) into one store; a rerun trains nothing again; each run equals the one the local
executor trains for the same config."""

import sys

import pytest

ray = pytest.importorskip("ray")

from trajscope.config import RecordConfig, RunConfig  # noqa: E402
from trajscope.errors import UsageError  # noqa: E402
from trajscope.store import Run, list_runs  # noqa: E402
from trajscope.sweep import run_configs  # noqa: E402


def _configs(tmp_path):
    small = dict(steps=20, eval_every=10, record=RecordConfig.preset("minimal"), workload_options={"width": 16})
    return [RunConfig.for_workload("digits-mlp", lr=lr, seed=s, **small) for lr, s in ((1e-3, 0), (3e-3, 0), (1e-3, 1))] \
        + [RunConfig.for_workload("cifar10-resnet20", steps=2, workload_options={"data_dir": str(tmp_path / "none")})]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_without_ray_the_executor_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(UsageError, match=r"optional extra 'ray'.*trajscope\[ray\]"):
        run_configs([RunConfig.for_workload("digits-mlp", steps=1)], tmp_path, executor="ray")


def test_ray_sweep_into_one_store_reports_failures_and_skips_finished_runs(cluster, tmp_path, capsys):
    root = tmp_path / "runs"
    configs = _configs(tmp_path)
    seen = []
    results = run_configs(configs, root, executor="ray", jobs=2, progress=False,
                          on_result=lambda i, s: seen.append(i))
    assert sorted(seen) == [0, 1, 2, 3]
    assert capsys.readouterr().out == ""  # Tune's tables go to stderr: stdout stays free for --json
    assert [r["status"] for r in results] == ["finished", "finished", "finished", "failed"]
    assert "cifar" in results[3]["error"].lower() or "data" in results[3]["error"].lower()
    assert [r["workload"] for r in results] == [c.workload for c in configs]
    runs = {i.run_id: i for i in list_runs(root) if i.status == "finished"}
    assert set(runs) == {r["run_id"] for r in results[:3]}
    assert all(i.steps == 20 for i in runs.values())
    assert [i.status for i in list_runs(root) if i.run_id not in runs] in ([], ["crashed"])  # no data, no steps
    mtimes = {r["run_id"]: (root / r["run_id"] / "run.db").stat().st_mtime_ns for r in results[:3]}

    again = run_configs(configs, root, executor="ray", jobs=2, progress=False)
    assert [r["status"] for r in again] == ["finished", "finished", "finished", "failed"]
    assert all(r.get("cached") for r in again[:3])
    assert {r["run_id"]: (root / r["run_id"] / "run.db").stat().st_mtime_ns for r in again[:3]} == mtimes

    # a trial's run is the run the local executor trains for the same config
    local = run_configs(configs[:1], tmp_path / "local", progress=False)[0]
    assert local["run_id"] == results[0]["run_id"]
    with Run.open(results[0]["path"]) as a, Run.open(local["path"]) as b:
        sa, sb = a.scalars(), b.scalars()
        assert sa[["step", "name"]].equals(sb[["step", "name"]])
        # float32 training in two processes: equal to rounding (bit-exact is not promised across them)
        assert sa["value"].tolist() == pytest.approx(sb["value"].tolist(), rel=1e-5, abs=1e-7, nan_ok=True)


def test_cli_sweep_reads_a_jsonl_file_and_runs_it_on_either_executor(cluster, tmp_path, capsys):
    import json

    from trajscope.cli import main
    from trajscope.store import run_id_for

    small = {"workload": "digits-mlp", "steps": 5, "eval_every": 5, "workload_options": {"width": 8},
             "record": {"snapshots": "none", "sketch_dim": 0}}
    lines = [small, {**small, "lr": 0.01}]
    file = tmp_path / "sweep.jsonl"
    file.write_text("# a comment\n" + "\n\n".join(json.dumps(x) for x in lines) + "\n")
    root = str(tmp_path / "runs")
    assert main(["sweep", str(file), "--root", root, "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert local["failed"] == 0 and [r["status"] for r in local["runs"]] == ["finished", "finished"]
    cfgs = [RunConfig.for_workload("digits-mlp", **{k: v for k, v in x.items() if k != "workload"}) for x in lines]
    assert [r["run_id"] for r in local["runs"]] == [run_id_for(c.model_dump(mode="json"), c.seed) for c in cfgs]

    file.write_text(file.read_text() + json.dumps({**small, "seed": 1}) + "\n")
    assert main(["sweep", str(file), "--root", root, "--executor", "ray", "--jobs", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone
    assert [bool(r.get("cached")) for r in out["runs"]] == [True, True, False]
    assert [r["status"] for r in out["runs"]] == ["finished"] * 3

    file.write_text(json.dumps(small) + "\n" + '{"workload": "digits-mlp", "lr": -1}\n')
    assert main(["sweep", str(file), "--root", root]) == 2
    assert "line 2" in capsys.readouterr().err
