"""Conformance: every registered probe (``trajscope.probes.all_probes()``), run by a real Trainer.

A probe is tested here by being registered (importing ``trajscope.probes`` imports every probe
module). Each runs twice in one short run, under two names and two schedules, and must write finite
scalars ``<name>/<quantity>`` exactly on its scheduled steps (the trainer emits STEP_END for steps
1..N), the same quantities under both names, and nothing under a name it was not given.
"""

import math

import pytest

import trajscope.probes as probes
from trajscope import schedules as S
from trajscope.config import RecordConfig, RunConfig
from trajscope.store import Run
from trajscope.train import Trainer

STEPS = 8
SCHEDULES = {"a": [1, 3, 7], "b": [2, 3]}  # overlapping at 3: instances must not collide


def test_registry_is_populated():
    names = probes.all_probes()
    assert "sharpness" in names
    for name, cls in names.items():
        assert cls.default_name == name and cls().name == name  # constructible with no arguments


def _instances():
    out = []
    for default, cls in sorted(probes.all_probes().items()):
        for tag, steps in SCHEDULES.items():
            out.append((cls(schedule=S.at(steps), name=f"{tag}-{default}"), steps))
    return out


@pytest.mark.parametrize("optimizer,extra", [("sgd", {"momentum": 0.9}), ("adam", {})])
def test_every_probe_writes_exactly_on_its_schedule(tmp_path, optimizer, extra):
    cfg = RunConfig.for_workload("mnist1d-cnn", workload_options={"width": 8}, optimizer=optimizer,
                                 lr=0.01, steps=STEPS, batch_size=64, eval_every=STEPS,
                                 record=RecordConfig.preset("none"), **extra)
    instances = _instances()
    result = Trainer(cfg, root=tmp_path, callbacks=[p for p, _ in instances], progress=False).fit()
    assert result["status"] == "finished"
    scalars = Run.open(result["path"]).scalars()
    quantities = {}
    for probe, steps in instances:
        mine = scalars[scalars["name"].str.startswith(probe.name + "/")]
        assert len(mine), f"probe {probe.name!r} wrote nothing"
        for qname, rows in mine.groupby("name"):
            assert sorted(rows["step"]) == steps, (qname, sorted(rows["step"]))
            assert all(math.isfinite(v) for v in rows["value"]), qname
        default = probe.name.split("-", 1)[1]
        names = {n.split("/", 1)[1] for n in mine["name"]}
        assert quantities.setdefault(default, names) == names  # same quantities under both names
    # every probe was given a name: nothing may appear under a default name
    assert not [n for n in scalars["name"].unique() if n.split("/", 1)[0] in probes.all_probes()]


def test_sharpness_after_backward_reuses_the_step_gradient_and_changes_nothing(tmp_path):
    """``at="after_backward"``: in a real Trainer it writes on its steps; in a plain loop it measures
    theta_{step-1} on the step's batch (against double backward there) and leaves parameters,
    buffers and gradients bit for bit as it found them."""
    import copy

    import torch

    from trajscope import workloads
    from trajscope.events import Event, StepContext
    from trajscope.functional.hessian import top_hessian_eigenvalues
    from trajscope.probes.sharpness import SharpnessProbe

    cfg = RunConfig.for_workload("mnist1d-cnn", workload_options={"width": 8}, optimizer="sgd", lr=0.01,
                                 momentum=0.9, steps=STEPS, batch_size=64, eval_every=STEPS,
                                 record=RecordConfig.preset("none"))
    probe = SharpnessProbe(schedule=S.at([2, 5]), name="early", at="after_backward")
    assert probe.event is Event.AFTER_BACKWARD
    result = Trainer(cfg, root=tmp_path, callbacks=[probe], progress=False).fit()
    scalars = Run.open(result["path"]).scalars()
    assert sorted(scalars[scalars["name"] == "early/lambda_max"]["step"]) == [2, 5]

    wl = workloads.get("mnist1d-cnn")
    data = wl.make_data(0, {})
    torch.manual_seed(0)
    model = wl.make_model({"width": 8})
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = SharpnessProbe(every=3, at="after_backward", tol=1e-3, value_tol=0)
    ctx = StepContext(config=None, run=None, model=model, optimizer=opt, workload=wl, data=data)
    for step in range(1, 7):
        x, y = data.x_train[64 * step:64 * (step + 1)], data.y_train[64 * step:64 * (step + 1)]
        opt.zero_grad()
        ctx.loss = wl.loss_fn(model(x), y)
        ctx.loss.backward()
        if probe.schedule(step):
            ctx.step, ctx.batch = step, (x, y)
            state = copy.deepcopy(model.state_dict())
            grads = [p.grad.clone() for p in model.parameters()]
            out = probe(ctx)
            assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
            assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
            ref = top_hessian_eigenvalues(model, wl.loss_fn, (x, y), tol=1e-7, max_iter=200).values[0]
            assert out["lambda_max"] == pytest.approx(float(ref), rel=3e-3)  # the difference's own error
        opt.step()
