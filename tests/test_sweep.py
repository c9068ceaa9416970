"""The local sweep executor: every config trained once into one store, failures isolated, reruns cached."""

import pytest

from trajscope.config import RecordConfig, RunConfig
from trajscope.errors import UsageError
from trajscope.store import Run, list_runs
from trajscope.sweep import failed, run_configs


def _cfgs():
    rec = RecordConfig.preset("minimal")
    good = [RunConfig.for_workload("digits-mlp", steps=6, eval_every=3, lr=lr, record=rec) for lr in (0.05, 0.1)]
    bad = RunConfig.for_workload("cifar10-resnet20", steps=2, record=rec)  # no CIFAR files under its data_dir
    return good + [bad]


@pytest.mark.parametrize("jobs", [1, 2])
def test_sweep_trains_each_config_reports_failures_and_reuses_finished_runs(tmp_path, jobs):
    root = tmp_path / "runs"
    cfgs = _cfgs()
    seen = []
    out = run_configs(cfgs, root=root, jobs=jobs, progress=False, on_result=lambda i, r: seen.append(i))
    assert [r["status"] for r in out] == ["finished", "finished", "failed"]
    assert sorted(seen) == [0, 1, 2]
    assert "data_batch_1" in failed(out)[0]["error"]
    # Each run is the one its config names, and equals a run trained alone in this process.
    for cfg, r in zip(cfgs[:2], out[:2]):
        assert Run.open(r["path"]).config["lr"] == cfg.lr
    alone = run_configs(cfgs[:1], root=tmp_path / "alone", progress=False)[0]
    assert alone["final"] == out[0]["final"]
    # A rerun trains nothing: the finished runs come back cached, and no new run directory appears.
    before = {i.run_id for i in list_runs(root)}
    again = run_configs(cfgs[:2], root=root, jobs=jobs, progress=False)
    assert all(r.get("cached") for r in again)
    assert {i.run_id for i in list_runs(root)} == before


def test_sweep_rejects_bad_executor_and_jobs(tmp_path):
    with pytest.raises(UsageError, match="unknown executor 'slurm'; valid choices: local, ray"):
        run_configs(_cfgs()[:1], root=tmp_path, executor="slurm")
    with pytest.raises(UsageError, match="at least 1"):
        run_configs(_cfgs()[:1], root=tmp_path, jobs=0)


class _Interrupt:
    def on_event(self, event, ctx):
        if ctx.step == 5 and event.value == "step_end":
            raise KeyboardInterrupt


def test_sweep_reuses_diverged_runs_and_resumes_crashed_ones(tmp_path):
    from trajscope.train import Trainer

    root = tmp_path / "runs"
    rec = RecordConfig(snapshots="none", sketch_dim=0, checkpoint_every=4)
    diverging = RunConfig.for_workload("digits-mlp", steps=20, lr=1e6, optimizer="sgd", momentum=0.9, record=rec)
    killed = RunConfig.for_workload("digits-mlp", steps=8, eval_every=4, record=rec)
    with pytest.raises(KeyboardInterrupt):
        Trainer(killed, root=root, callbacks=[_Interrupt()], progress=False).fit()
    out = run_configs([diverging, killed], root=root, progress=False)
    assert [r["status"] for r in out] == ["diverged", "finished"]
    assert "resumed" in Run.open(out[1]["path"]).events()["kind"].tolist()
    uninterrupted = run_configs([killed], root=tmp_path / "fresh", progress=False)[0]
    assert out[1]["final"] == uninterrupted["final"]
    again = run_configs([diverging], root=root, progress=False)[0]
    assert again["status"] == "diverged" and again["cached"]
