import pytest
import torch

from trajscope.config import RecordConfig, RunConfig
from trajscope.errors import UsageError
from trajscope.events import Event, documented_loop
from trajscope.store import Run
from trajscope.train import Callback, Trainer, schedule_factor


class Log(Callback):
    def __init__(self):
        self.events = []

    def on_event(self, event, ctx):
        self.events.append((event, ctx.step))


def _cfg(**kw):
    base = dict(steps=12, eval_every=5, batch_size=32, record=RecordConfig(checkpoint_every=4))
    base.update(kw)
    return RunConfig.for_workload("digits-mlp", **base)


def test_trainer_emits_the_documented_events_in_order(root):
    log = Log()
    Trainer(_cfg(steps=5, eval_every=5), root=root, callbacks=[log], progress=False).fit()
    seen = [e for e, _ in log.events]
    doc = documented_loop()
    per_step = doc[doc.index(Event.STEP_START):doc.index(Event.EVAL_START)]
    evals = [Event.EVAL_START, Event.EVAL_END]
    expected = doc[:2] + per_step * 5 + evals + [Event.FIT_END]
    assert seen == expected
    assert set(doc) == set(Event)  # every event is documented in the loop


def test_same_config_and_seed_give_bitwise_identical_scalars(tmp_path):
    a = Trainer(_cfg(), root=tmp_path / "a", progress=False).fit()
    b = Trainer(_cfg(), root=tmp_path / "b", progress=False).fit()
    assert a["run_id"] == b["run_id"]
    sa, sb = Run.open(a["path"]).scalars(), Run.open(b["path"]).scalars()
    assert sa.equals(sb)  # bitwise, NaN-free
    assert torch.equal(Run.open(a["path"]).sketches()[1], Run.open(b["path"]).sketches()[1])
    c = Trainer(_cfg(seed=1), root=tmp_path / "a", progress=False).fit()
    assert c["run_id"] != a["run_id"]
    assert not Run.open(c["path"]).scalars().equals(sa)


@pytest.mark.parametrize("optimizer,extra", [("sgd", {"momentum": 0.9, "nesterov": True}), ("adamw", {})])
def test_resume_from_checkpoint_continues_exactly(tmp_path, optimizer, extra):
    cfg = _cfg(optimizer=optimizer, lr=0.01, **extra)
    full = Trainer(cfg, root=tmp_path / "full", progress=False).fit()
    # Interrupt a second run after step 9 (its last checkpoint is step 8), then resume it.
    class Stop(Callback):
        def on_step_end(self, ctx):
            if ctx.step == 9:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, root=tmp_path / "part", callbacks=[Stop()], progress=False).fit()
    assert Run.open(tmp_path / "part" / full["run_id"]).status == "crashed"
    resumed = Trainer(cfg, root=tmp_path / "part", progress=False, resume=True).fit()
    assert resumed["status"] == "finished"
    r_full, r_res = Run.open(full["path"]), Run.open(resumed["path"])
    assert r_full.scalars().equals(r_res.scalars())
    assert torch.equal(r_full.sketches()[1], r_res.sketches()[1])
    assert "resumed" in r_res.events()["kind"].tolist()


def test_finished_run_is_reused_and_overwrite_retrains(root):
    a = Trainer(_cfg(steps=3), root=root, progress=False).fit()
    b = Trainer(_cfg(steps=3), root=root, progress=False).fit()
    assert b.get("cached") and b["run_id"] == a["run_id"]
    c = Trainer(_cfg(steps=3), root=root, progress=False, overwrite=True).fit()
    assert not c.get("cached") and c["status"] == "finished"


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "muon"])
def test_every_optimizer_trains(root, optimizer):
    lr = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3, "muon": 0.02}[optimizer]
    res = Trainer(_cfg(optimizer=optimizer, lr=lr, steps=60, eval_every=60, momentum=0.9 if optimizer != "adam" else 0.0),
                  root=root, progress=False).fit()
    wide = Run.open(res["path"]).scalars(wide=True)
    # 60 steps of any of these optimizers lowers the training loss well below its start (ln 10 = 2.30).
    assert wide["loss"].iloc[-10:].mean() < 0.7 * wide["loss"].iloc[:3].mean()
    assert res["final"]["val_metric"] > 0.5


def test_muon_gets_hidden_matrices_only():
    from trajscope import workloads
    from trajscope.train.optim import make_optimizer

    cfg = RunConfig.for_workload("mnist1d-mlp", optimizer="muon", lr=0.02, momentum=0.9)
    torch.manual_seed(0)
    model = workloads.get("mnist1d-mlp").make_model(cfg.workload_options)
    opt = make_optimizer(model, cfg)
    muon, adamw = opt.parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    shapes = [tuple(p.shape) for g in muon.param_groups for p in g["params"]]
    assert shapes == [(256, 256)]  # the one hidden 256x256 matrix of 40-256-256-10


def test_schedules_closed_forms():
    c = _cfg(schedule="warmup-cosine", warmup_steps=10, steps=110)
    assert schedule_factor(c, 5) == pytest.approx(0.5)
    assert schedule_factor(c, 10) == pytest.approx(1.0)
    assert schedule_factor(c, 60) == pytest.approx(0.5)
    assert schedule_factor(c, 110) == pytest.approx(0.0, abs=1e-12)
    s = _cfg(schedule="step", step_every=10, step_gamma=0.5)
    assert [schedule_factor(s, t) for t in (1, 10, 11, 21)] == [1, 1, 0.5, 0.25]
    e = _cfg(schedule="exp", exp_growth=1.1)
    assert schedule_factor(e, 11) == pytest.approx(1.1 ** 10)
    assert schedule_factor(_cfg(schedule="constant"), 77) == 1.0


def test_lr_schedule_is_what_the_run_records(root):
    cfg = _cfg(schedule="warmup-cosine", warmup_steps=4, steps=12, lr=0.2)
    res = Trainer(cfg, root=root, progress=False).fit()
    wide = Run.open(res["path"]).scalars(wide=True)
    for t in range(1, 13):
        assert wide.loc[t, "lr"] == pytest.approx(0.2 * schedule_factor(cfg, t))


def test_config_errors_are_one_line_usage_errors():
    with pytest.raises(UsageError, match="unknown optimizer 'lion'.*adam, adamw, muon, prodigy, schedulefree, sgd"):
        RunConfig.for_workload("digits-mlp", optimizer="lion")
    with pytest.raises(UsageError, match="unknown workload 'imagenet'"):
        RunConfig.for_workload("imagenet")
    with pytest.raises(UsageError, match="invalid lr"):
        RunConfig.for_workload("digits-mlp", lr=-1.0)
    with pytest.raises(UsageError, match="unknown option for workload"):
        RunConfig.for_workload("digits-mlp", workload_options={"depthh": 3})
    with pytest.raises(UsageError, match="nesterov"):
        RunConfig.for_workload("digits-mlp", optimizer="adam", nesterov=True)


def test_nan_during_training_reports_diverged(root):
    res = Trainer(RunConfig.for_workload("mnist1d-mlp", lr=1e4, steps=50, eval_every=10,
                                         record=RecordConfig.preset("minimal")), root=root, progress=False).fit()
    assert res["status"] == "diverged" and res["diverged_at"] <= 50
    r = Run.open(res["path"])
    assert r.status == "diverged"
    assert sorted(set(r.scalars()["step"])) == list(range(res["diverged_at"] + 1))
    reason = r.meta["status_reason"]
    assert reason == "parameters are not finite" or reason.startswith("loss is"), reason
