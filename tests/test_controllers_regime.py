"""Regime-aware decisions: controllers given ``regime=<probe>`` refuse to act while the activation
regime is chaotic, act once it is not, act when it is unknown, and read the real RegimeProbe in a
Trainer."""

import json

import pytest
import torch
from torch import nn

from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.controllers import KIND, LoopHooks
from trajscope.controllers.freeze import FreezeController
from trajscope.controllers.regime import CHAOTIC, STABLE, RegimeGate
from trajscope.controllers.stability import StabilityController
from trajscope.events import Callback
from trajscope.store import Run
from trajscope.train import Trainer

X = torch.diag(torch.tensor([1.0, 2.0, 3.0]))  # H = diag(1, 4, 9) / 3
Y = torch.zeros(3, 1)


def mse(out, y):
    return 0.5 * ((out - y) ** 2).sum(-1).mean()


class ScriptedRegime(Callback):
    """Writes ``<name>/label`` = labels(step) into ctx.values at STEP_END, like a RegimeProbe."""

    def __init__(self, labels, name="regime"):
        self.labels, self.name = labels, name

    def on_step_end(self, ctx):
        label = self.labels(ctx.step)
        if label is not None:
            ctx.values[f"{self.name}/label"] = float(label)


def _stability_loop(labels, steps=12, regime="regime"):
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # ratio 0.075: far below the band
    ctl = StabilityController(every=1, tol=1e-8, max_iter=10, regime=regime)
    hooks = LoopHooks([ScriptedRegime(labels), ctl], model, opt, loss_fn=mse)
    hooks.start()
    mult = []
    for _ in range(steps):
        loss = mse(model(X), Y)
        loss.backward()
        hooks.before_optimizer_step((X, Y), loss)
        opt.step()
        hooks.after_optimizer_step()
        opt.zero_grad()
        mult.append(ctl.state.multiplier)
    return ctl, hooks, mult


def test_stability_refuses_in_the_chaotic_regime_then_acts():
    ctl, hooks, mult = _stability_loop(lambda t: CHAOTIC if t <= 5 else STABLE)
    assert mult[:5] == [1.0] * 5 and mult[5] == pytest.approx(1.25)
    assert ctl.state.refusals == 5
    held = [d for d in hooks.run.decisions() if d["message"] == "held: chaotic regime"]
    assert [d["step"] for d in held] == [1, 2, 3, 4, 5]
    assert held[0]["data"]["evidence"]["regime"] == "chaotic" and "chaotic" in held[0]["data"]["reason"]
    acted = [d for d in hooks.run.decisions() if d["message"].startswith("lr multiplier")]
    assert acted[0]["step"] == 6 and acted[0]["data"]["evidence"]["regime_label"] == STABLE


def test_latest_label_holds_between_measurements_and_unknown_acts():
    # measured at steps 2 and 6 only: chaotic from 2 to 5, stable from 6; step 1 is unknown -> acts
    ctl, hooks, mult = _stability_loop(lambda t: {2: CHAOTIC, 6: STABLE}.get(t), steps=7)
    assert mult == pytest.approx([1.25, 1.25, 1.25, 1.25, 1.25, 1.5625, 1.953125])
    first = hooks.run.decisions()[0]
    assert first["step"] == 1 and first["data"]["evidence"]["regime_label"] is None
    assert ctl.state.refusals == 4


def test_without_a_gate_the_regime_is_ignored():
    _, _, mult = _stability_loop(lambda t: CHAOTIC, steps=3, regime=None)
    assert mult == pytest.approx([1.25, 1.5625, 1.953125])
    with pytest.raises(ValueError):
        RegimeGate("")


class Path(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d))
        self.b = nn.Parameter(torch.zeros(1))


def test_freeze_holds_the_switch_while_chaotic():
    d = 2000
    g = torch.Generator().manual_seed(0)
    line = torch.randn(d, generator=g) + torch.arange(61)[:, None] * torch.randn(d, generator=g)
    model = Path(d)
    ctl = FreezeController(keep="b", window=10, every=5, patience=1, regime="regime")
    hooks = LoopHooks([ScriptedRegime(lambda t: CHAOTIC if t < 30 else STABLE), ctl], model, None)
    with torch.no_grad():
        model.theta.copy_(line[0])
    hooks.start()
    for t in range(1, 61):
        hooks.before_optimizer_step()
        with torch.no_grad():
            if model.theta.requires_grad:
                model.theta.copy_(line[t])
        hooks.after_optimizer_step()
    held = [d["step"] for d in hooks.run.decisions() if d["message"] == "held: chaotic regime"]
    assert held == [10, 15, 20, 25]  # redundant from the first eligible decision on, but chaotic
    assert ctl.state.switch_step == 30 and not model.theta.requires_grad


def test_trainer_reads_the_real_regime_probe(root):
    cfg = RunConfig.for_workload(
        "mnist1d-cnn", workload_options={"width": 8}, lr=0.01, momentum=0.9, steps=12, batch_size=64,
        eval_every=12, schedule="constant", record=RecordConfig.preset("minimal"),
        probes=(CallbackSpec(kind="regime", options={"delta": 2, "size": 64}),),
        controllers=(CallbackSpec(kind="stability", every=3, options={"regime": "regime"}),))
    out = Trainer(cfg, root=root, progress=False).fit()
    run = Run.open(out["path"])
    labels = run.scalars(["regime/label"], wide=True)["regime/label"]
    assert sorted(labels.index.tolist()) == [2, 4, 6, 8, 10, 12]
    ev = run.events()
    ev = ev[ev["kind"] == KIND]
    assert len(ev), "no decisions: the run starts far below the band, so it must act or refuse"
    for step, message, data in zip(ev["step"], ev["message"], ev["data"]):
        data = data if isinstance(data, dict) else json.loads(data)
        e = data["evidence"]
        latest = max(s for s in labels.index if s <= step)
        assert e["regime_step"] == latest and e["regime_label"] == int(labels[latest])
        assert (message == "held: chaotic regime") == (e["regime_label"] == CHAOTIC)
