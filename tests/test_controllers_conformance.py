"""Conformance: every registered controller (``trajscope.controllers.all_controllers()``), run by a
real Trainer, and resumed bit-exactly.

A controller is tested here by being registered. Each is built with no arguments, runs twice in one
short run under a name of its own, and must write its decisions (event kind ``controller``) with its own
name, a reason, evidence and its state as plain JSON, write scalars only under the names it was
given, and round-trip its state through ``state_dict``/``load_state_dict``. A run with a controller
interrupted and resumed from its checkpoint must equal the uninterrupted run: scalars, sketches,
decisions and final weights, bit for bit (checked for the stability and freeze controllers, alone
and together, with the freeze switching before and after the resume point).
"""

import json

import pytest
import torch

import trajscope.controllers as controllers
from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.errors import UsageError
from trajscope.events import Callback
from trajscope.store import Run
from trajscope.train import Trainer

STEPS = 16


def _cfg(optimizer="sgd", controllers_=(), **extra):
    kw = {"momentum": 0.9} if optimizer == "sgd" else {}
    kw.update(extra)
    return RunConfig.for_workload("mnist1d-cnn", workload_options={"width": 8}, optimizer=optimizer,
                                  lr=0.05 if optimizer == "sgd" else 0.003, steps=STEPS, batch_size=64,
                                  schedule="constant", weight_decay=0.0,
                                  eval_every=8, record=RecordConfig(snapshots="none", sketch_dim=64,
                                                                    checkpoint_every=4),
                                  controllers=tuple(controllers_), **kw)


def _decisions(path):
    """(step, message, data) of the controller decisions, without those an interrupted attempt wrote
    after the checkpoint it was later resumed from (the store keeps events on resume; the resumed
    run writes those steps' decisions again)."""
    ev = Run.open(path).events().reset_index(drop=True)
    for i in ev.index[ev["kind"] == "resumed"]:
        start = int(ev.loc[i, "step"])
        ev = ev[~((ev.index < i) & (ev["step"] > start))]
    ev = ev[ev["kind"] == controllers.KIND]
    return [(int(s), m, d if isinstance(d, dict) else json.loads(d))
            for s, m, d in zip(ev["step"], ev["message"], ev["data"])]


def test_registry_is_populated_and_buildable_without_arguments():
    names = controllers.all_controllers()
    assert {"stability", "freeze"} <= set(names)
    for name, cls in names.items():
        ctl = cls()
        assert cls.default_name == name and ctl.name == name
        json.dumps(ctl.decision_state())  # plain JSON values


KINDS = sorted(controllers.all_controllers())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_controller_runs_in_a_trainer_under_its_own_names(tmp_path, kind, optimizer):
    """SGD with momentum at a constant rate is the config every controller must accept; under Adam a
    controller may refuse the config, with a one-line UsageError before the first step."""
    cls = controllers.all_controllers()[kind]
    instances = [cls(name=f"my-{kind}")]  # one per run: some controllers reshape the optimizer
    try:
        result = Trainer(_cfg(optimizer), root=tmp_path, callbacks=instances, progress=False).fit()
    except UsageError as e:
        assert optimizer != "sgd" and "\n" not in str(e), e
        return
    assert result["status"] in ("finished", "stopped")
    given = {c.name for c in instances}
    for step, message, data in _decisions(result["path"]):
        assert data["controller"] in given and isinstance(message, str) and message
        assert isinstance(data["reason"], str) and isinstance(data["evidence"], dict)
        assert isinstance(data["state"], dict)
    scalars = Run.open(result["path"]).scalars()
    owners = {n.split("/", 1)[0] for n in scalars["name"].unique() if "/" in n}
    assert not owners & set(controllers.all_controllers()), owners  # nothing under a default name
    for ctl in instances:
        fresh = type(ctl)(name=ctl.name)
        fresh.load_state_dict(ctl.state_dict())
        assert fresh.decision_state() == ctl.decision_state()
        json.dumps(ctl.decision_state())


class Interrupt(Callback):
    def on_step_end(self, ctx):
        if ctx.step == 9:  # after the checkpoint of step 8
            raise KeyboardInterrupt


SPECS = [
    ("stability", {"every": 3}),
    ("freeze", {"window": 4, "every": 2, "threshold": 10.0, "patience": 2}),  # switches at step 6, before 8
    ("freeze", {"window": 4, "every": 2, "threshold": 10.0, "patience": 5}),  # at step 12, after the resume
    ("freeze", {"at_step": 10}),
    ("stability+freeze", {}),
]


def _specs(kind, options):
    if kind == "stability+freeze":
        return (CallbackSpec(kind="stability", every=2), CallbackSpec(kind="freeze", options={"at_step": 5}))
    opts = dict(options)
    every = opts.pop("every", None)
    return (CallbackSpec(kind=kind, every=every, options=opts),)


@pytest.mark.parametrize("kind,options", SPECS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(SPECS)])
def test_resumed_run_with_a_controller_equals_the_uninterrupted_one(tmp_path, kind, options):
    cfg = _cfg(controllers_=_specs(kind, options))
    full = Trainer(cfg, root=tmp_path / "full", progress=False).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, root=tmp_path / "part", callbacks=[Interrupt()], progress=False).fit()
    resumed = Trainer(cfg, root=tmp_path / "part", progress=False, resume=True).fit()
    assert resumed["status"] == full["status"]
    a, b = Run.open(full["path"]), Run.open(resumed["path"])
    assert a.scalars().equals(b.scalars())
    assert torch.equal(a.sketches()[1], b.sketches()[1])
    assert _decisions(full["path"]) == _decisions(resumed["path"])
    last = a.snapshot_steps("checkpoint")[-1]
    wa, wb = a.load_state(last)["model"], b.load_state(last)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    if kind == "freeze" and "threshold" in options:
        (switch,) = [d for d in _decisions(full["path"]) if d[1].startswith("froze")]
        assert switch[0] == (6 if options["patience"] == 2 else 12)
