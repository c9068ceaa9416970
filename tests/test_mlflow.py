"""MLflow export: a recorded run written to a file store and to a SQLite store, read back with
MlflowClient: params are the flattened config, every scalar is a metric with its steps."""

import json

import pytest

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from trajscope.cli import main  # noqa: E402
from trajscope.config import RecordConfig, RunConfig  # noqa: E402
from trajscope.errors import UsageError  # noqa: E402
from trajscope.integrations.mlflow import _file_store_allowed, export_mlflow, flatten_params  # noqa: E402
from trajscope.store import Run  # noqa: E402
from trajscope.train import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = RunConfig.for_workload("digits-mlp", steps=12, eval_every=6, record=RecordConfig.preset("minimal"),
                                 workload_options={"width": 16})
    return Trainer(cfg, root=root, progress=False, name="small").fit()["path"]


def test_flatten_params():
    flat = flatten_params({"lr": 0.1, "record": {"sketch_dim": 64, "params": None}, "opts": {}, "probes": [{"k": 1}],
                           "workload": "w"}, seed=3)
    assert flat == {"lr": "0.1", "record.sketch_dim": "64", "record.params": "null", "opts": "{}",
                    "probes": '[{"k": 1}]', "workload": "w", "seed": "3"}
    with pytest.raises(UsageError, match="at most 6000"):
        flatten_params({"x": "y" * 6001})


def _check(client: MlflowClient, info: dict, run_path: str):
    r = Run.open(run_path)
    mrun = client.get_run(info["mlflow_run_id"])
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == "small"
    assert mrun.data.tags["trajscope.run_id"] == r.id and mrun.data.tags["trajscope.workload"] == "digits-mlp"
    assert mrun.data.params == flatten_params(r.config, seed=r.seed)
    assert mrun.data.params["workload_options.width"] == "16" and mrun.data.params["lr"] == str(r.config["lr"])
    wide = r.scalars(wide=True)
    assert set(mrun.data.metrics) == set(wide.columns)
    for name in wide.columns:
        want = wide[name].dropna()
        hist = sorted(client.get_metric_history(info["mlflow_run_id"], name), key=lambda m: m.step)
        assert [m.step for m in hist] == want.index.tolist()
        assert [m.value for m in hist] == pytest.approx(want.tolist(), rel=1e-12)  # float64 both sides
    assert info["metrics"] == int(wide.notna().sum().sum())
    r.close()


def test_export_to_a_file_store_and_replace_on_reexport(run_path, tmp_path):
    store = tmp_path / "mlruns"
    info = export_mlflow(run_path, out=store)
    with _file_store_allowed(str(store)):
        client = MlflowClient(tracking_uri=str(store))
        _check(client, info, run_path)
        again = export_mlflow(run_path, out=store)
        assert again["replaced"] == 1 and again["mlflow_run_id"] != info["mlflow_run_id"]
        live = client.search_runs([again["experiment_id"]])
        assert [m.info.run_id for m in live] == [again["mlflow_run_id"]]


def test_cli_exports_to_sqlite(run_path, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["export", run_path, "--format", "mlflow", "--out", uri, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "mlflow" and info["uri"] == uri
    _check(MlflowClient(tracking_uri=uri), info, run_path)
    assert main(["export", run_path, "--format", "wandb"]) == 2
    assert "valid choices" in capsys.readouterr().err
