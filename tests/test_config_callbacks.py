"""Probes and controllers named in a run's config: parsing, building, scheduling, state on resume."""

import json
from dataclasses import dataclass

import pytest

from trajscope import controllers
from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.controllers import Controller
from trajscope.errors import UsageError
from trajscope.events import Callback, Event
from trajscope.store import Run
from trajscope.store.paths import is_run_dir
from trajscope.train import Trainer
from trajscope.train.trainer import build_callbacks


def _cfg(**kw):
    base = dict(steps=12, eval_every=6, batch_size=32, record=RecordConfig(checkpoint_every=4))
    base.update(kw)
    return RunConfig.for_workload("digits-mlp", **base)


def test_parse_reads_kind_name_every_and_json_options():
    spec = CallbackSpec.parse("sharpness:every=16,k=2,name=s2,data=fixed,tol=1e-3")
    assert spec == CallbackSpec(kind="sharpness", name="s2", every=16, options={"k": 2, "data": "fixed", "tol": 1e-3})
    assert CallbackSpec.parse("noise") == CallbackSpec(kind="noise")
    with pytest.raises(UsageError, match="expected KIND:key=value"):
        CallbackSpec.parse("sharpness:every")
    with pytest.raises(UsageError, match="invalid every"):
        CallbackSpec.parse("sharpness:every=0")


def test_specs_change_the_run_id():
    a, b = _cfg(), _cfg(probes=(CallbackSpec(kind="sharpness", every=4),))
    from trajscope.store import run_id_for

    assert run_id_for(a.model_dump(mode="json"), 0) != run_id_for(b.model_dump(mode="json"), 0)


class Reader(Callback):
    """Records what a later callback sees in ctx.values at STEP_END."""

    def __init__(self):
        self.seen = {}

    def on_event(self, event, ctx):
        if event is Event.STEP_END and ctx.values:
            self.seen[ctx.step] = dict(ctx.values)


def test_configured_probe_writes_on_its_steps_and_fills_ctx_values(root):
    cfg = _cfg(probes=(CallbackSpec(kind="sharpness", name="curv", every=5, options={"tol": 0.01}),))
    reader = Reader()
    out = Trainer(cfg, root=root, callbacks=[reader], progress=False).fit()
    r = Run.open(out["path"])
    steps = sorted(r.scalars(["curv/lambda_max"])["step"].tolist())
    assert steps == [5, 10]
    assert sorted(reader.seen) == [5, 10]
    wide = r.scalars(["curv/lambda_max"], wide=True)
    assert reader.seen[10]["curv/lambda_max"] == pytest.approx(float(wide.loc[10, "curv/lambda_max"]))
    assert r.config["probes"][0]["kind"] == "sharpness"


def test_bad_specs_fail_in_one_line_before_a_run_exists(root):
    with pytest.raises(UsageError, match="unknown probe 'bogus'; valid choices: .*sharpness"):
        Trainer(_cfg(probes=(CallbackSpec(kind="bogus"),)), root=root, progress=False).fit()
    with pytest.raises(UsageError, match="probe 'sharpness'.*unexpected keyword argument 'nope'"):
        Trainer(_cfg(probes=(CallbackSpec(kind="sharpness", options={"nope": 1}),)), root=root, progress=False).fit()
    with pytest.raises(UsageError, match="probe 'sharpness'.*at must be one of .*got 'foo'"):
        Trainer(_cfg(probes=(CallbackSpec(kind="sharpness", options={"at": "foo"}),)), root=root, progress=False).fit()
    twice = (CallbackSpec(kind="sharpness", every=3), CallbackSpec(kind="sharpness", every=4))
    with pytest.raises(UsageError, match="named 'sharpness'"):
        build_callbacks(_cfg(probes=twice))
    assert not root.exists() or not any(is_run_dir(p) for p in root.iterdir())


@dataclass
class CountState:
    ends: int = 0


class Counter(Controller):
    """A test controller: counts STEP_END events in its state and logs a decision every 5."""

    default_name = "counter"

    def __init__(self, name=None, every=None):
        super().__init__(name)
        self.state = CountState()

    def on_step_end(self, ctx):
        self.state.ends += 1
        if ctx.step % 5 == 0:
            self.decide(ctx, f"count {self.state.ends}", reason="every fifth step", evidence={"step": ctx.step})


class Interrupt(Callback):
    def on_step_end(self, ctx):
        if ctx.step == 11:  # after the step-10 decision; the last checkpoint is step 8
            raise KeyboardInterrupt


def test_controller_state_is_checkpointed_and_restored_on_resume(tmp_path, monkeypatch):
    monkeypatch.setitem(controllers.REGISTRY, "counter", Counter)
    cfg = _cfg(controllers=(CallbackSpec(kind="counter"),))
    full = Trainer(cfg, root=tmp_path / "full", progress=False).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, root=tmp_path / "part", callbacks=[Interrupt()], progress=False).fit()
    resumed = Trainer(cfg, root=tmp_path / "part", progress=False, resume=True).fit()
    assert resumed["status"] == "finished"

    def decisions(path):
        ev = Run.open(path).events()
        ev = ev[ev["kind"] == controllers.KIND]
        return [(int(s), m) for s, m in zip(ev["step"], ev["message"])]

    # Resumed from step 8 with ends=8 restored: the step-10 decision counts 10, as uninterrupted,
    assert decisions(full["path"]) == [(5, "count 5"), (10, "count 10")]
    # and the interrupted attempt's decisions after step 8 are gone: the log equals the uninterrupted one.
    assert decisions(resumed["path"]) == decisions(full["path"])
    ev = Run.open(resumed["path"]).events()
    data = json.loads(ev[ev["kind"] == controllers.KIND]["data"].iloc[-1])
    assert data["state"] == {"ends": 10} and data["reason"] == "every fifth step" and data["controller"] == "counter"
