"""The stability controller against closed forms on quadratics (SGD, heavy ball, Adam's
preconditioned sharpness), its bounded changes, its composition with the Trainer's schedule, and
the command line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.controllers import KIND, LoopHooks
from trajscope.controllers.stability import StabilityController, next_multiplier
from trajscope.errors import UsageError
from trajscope.functional.hessian import adam_preconditioner
from trajscope.store import Run
from trajscope.train import Trainer
from trajscope.train.optim import schedule_factor

LAMBDAS = torch.tensor([1.0, 4.0, 9.0]) / 3  # H = X^T X / 3 = diag(1, 4, 9) / 3: lambda_max = 3
X = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
Y = torch.zeros(3, 1)


def mse(out, y):
    return 0.5 * ((out - y) ** 2).sum(-1).mean()


def _quadratic(make_opt, steps, **options):
    """Full-batch training of L(w) = w^T H w / 2 in a plain loop with a stability controller."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    opt = make_opt(model.parameters())
    ctl = StabilityController(every=1, tol=1e-8, max_iter=10, **options)
    hooks = LoopHooks([ctl], model, opt, loss_fn=mse)
    hooks.start()
    lrs = []
    for _ in range(steps):
        loss = mse(model(X), Y)
        loss.backward()
        hooks.before_optimizer_step((X, Y), loss)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        hooks.after_optimizer_step()
        opt.zero_grad()
    return ctl, hooks, lrs, opt, model


@pytest.mark.parametrize("lr0", [0.05, 1.0])  # far below the band, and unstable (eta lambda = 3 > 2)
def test_sgd_lr_converges_into_the_band_around_c_2_over_lambda(lr0):
    ctl, hooks, lrs, _, _ = _quadratic(lambda p: torch.optim.SGD(p, lr=lr0), steps=40)
    lam = 3.0
    # ratio = lambda eta / 2, so the band [0.8, 0.95] is eta in [2 * 0.8 / lambda, 2 * 0.95 / lambda]
    assert 2 * 0.8 / lam - 1e-9 <= lrs[-1] <= 2 * 0.95 / lam + 1e-9
    assert ctl.state.lambda_max == pytest.approx(lam, rel=1e-6)
    assert ctl.state.multiplier == pytest.approx(lrs[-1] / lr0, rel=1e-12)
    # every change is bounded by the factor 1 + max_change = 1.25
    for a, b in zip(lrs, lrs[1:]):
        assert 1 / 1.25 - 1e-12 <= b / a <= 1.25 + 1e-12
    ratios = [r for _, r in hooks.run.scalars["stability/ratio"]]
    assert all(r == pytest.approx(lam * lr / 2, rel=1e-6) for r, lr in zip(ratios, lrs))
    changes = hooks.run.decisions("stability")
    assert len(changes) == ctl.state.changes >= 1
    assert all(0.8 <= r <= 0.95 for r in ratios[len(changes):])  # in the band after the last change


def test_heavy_ball_uses_the_momentum_threshold():
    beta = 0.9
    # loss_guard off: heavy ball's loss on a quadratic is not monotone, so the new-low rule would hold
    # raises; this test is about the threshold (the guard has its own test below)
    ctl, _, lrs, _, _ = _quadratic(lambda p: torch.optim.SGD(p, lr=0.1, momentum=beta), steps=40, loss_guard=False)
    thr_lr = (2 + 2 * beta) / 3.0  # eta at which lambda_max = (2 + 2 beta) / eta
    assert 0.8 * thr_lr - 1e-9 <= lrs[-1] <= 0.95 * thr_lr + 1e-9


def test_adam_compares_the_preconditioned_sharpness():
    def make(p):
        return torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.999))

    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    opt = make(model.parameters())
    ctl = StabilityController(every=1, tol=1e-8, max_iter=10)
    hooks = LoopHooks([ctl], model, opt, loss_fn=mse)
    hooks.start()
    for step in range(1, 6):
        loss = mse(model(X), Y)
        loss.backward()
        hooks.before_optimizer_step((X, Y), loss)
        opt.step()
        hooks.after_optimizer_step()
        opt.zero_grad()
        # reference: the top eigenvalue of D^{-1/2} H D^{-1/2} by eigvalsh, D Adam's denominator
        s = adam_preconditioner(opt, [model.weight]).double().rsqrt()
        ref = torch.linalg.eigvalsh(s[:, None] * torch.diag(LAMBDAS.double()) * s[None, :])[-1]
        lr = opt.param_groups[0]["lr"]
        (ratio_step, ratio), = hooks.run.scalars["stability/ratio"][-1:]
        assert ratio_step == step and ratio == pytest.approx(float(ref) * lr * 0.1 / 3.8, rel=1e-5)


def test_plain_loop_multiplier_does_not_compound():
    model = nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = StabilityController(every=1000)  # never measures: only applies its multiplier
    ctl.state.multiplier = 0.5
    hooks = LoopHooks([ctl], model, opt, loss_fn=mse)
    for _ in range(3):
        hooks.before_optimizer_step((X, Y))
        assert opt.param_groups[0]["lr"] == 0.05
        hooks.after_optimizer_step()
    opt.param_groups[0]["lr"] = 0.2  # the user's own schedule writes a new base
    hooks.before_optimizer_step((X, Y))
    assert opt.param_groups[0]["lr"] == 0.1


def test_decision_rule_bounds():
    kw = dict(low=0.8, high=0.95, target=0.875, max_change=0.25, min_multiplier=0.01, max_multiplier=2.0)
    assert next_multiplier(1.0, 0.9, **kw) == 1.0
    assert next_multiplier(1.0, 0.1, **kw) == 1.25 and next_multiplier(1.0, 10.0, **kw) == 0.8
    assert next_multiplier(1.0, 1.0, **kw) == pytest.approx(0.875)
    assert next_multiplier(1.9, 0.1, **kw) == 2.0 and next_multiplier(1.0, -1.0, **kw) == 1.25
    with pytest.raises(UsageError):
        StabilityController(low=0.9, high=0.8)


def test_trainer_composes_the_multiplier_with_the_schedule(root):
    cfg = RunConfig.for_workload("mnist1d-cnn", workload_options={"width": 8}, lr=0.02, momentum=0.9, steps=12,
                                 batch_size=64, eval_every=12, schedule="warmup-cosine", warmup_steps=3,
                                 record=RecordConfig.preset("minimal"),
                                 controllers=(CallbackSpec(kind="stability", every=3, options={"max_change": 0.5}),))
    out = Trainer(cfg, root=root, progress=False).fit()
    run = Run.open(out["path"])
    lr = run.scalars(["lr"], wide=True)["lr"]
    ev = run.events()
    ev = ev[ev["kind"] == KIND]
    after = {int(s): (d if isinstance(d, dict) else json.loads(d))["state"]["multiplier"]
             for s, d in zip(ev["step"], ev["data"])}
    assert after, "the controller never changed the lr (the run starts far below the band)"
    m = 1.0
    for step in range(1, 13):
        assert lr[step] == pytest.approx(cfg.lr * schedule_factor(cfg, step) * m, rel=1e-12)
        m = after.get(step, m)  # a decision at STEP_END applies from the next step on
    ratios = run.scalars(["stability/ratio"], wide=True)["stability/ratio"]
    assert sorted(ratios.index.tolist()) == [3, 6, 9]  # the cosine schedule ends at lr 0: no ratio


def test_cli_stability_and_its_bad_options(tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "trajscope.cli", "run", "digits-mlp", "--steps", "6", "--eval-every", "6",
            "--record", "minimal", "--root", str(tmp_path)]
    p = subprocess.run(base + ["--controller", "stability:every=2,low=0.5,high=0.9", "--json"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    run = Run.open(json.loads(p.stdout)["path"])
    assert sorted(run.scalars(["stability/ratio"])["step"].tolist()) == [2, 4, 6]
    ev = run.events()
    n = int((ev["kind"] == KIND).sum())
    shown = subprocess.run([sys.executable, "-m", "trajscope.cli", "show", json.loads(p.stdout)["run_id"], "--root",
                            str(tmp_path), "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert json.loads(shown.stdout)["decisions"] == ({"stability": n} if n else {})
    bad = subprocess.run(base + ["--controller", "stability:low=0.9,high=0.5"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_reads_a_sharpness_probe_instead_of_measuring(root):
    cfg = RunConfig.for_workload("digits-mlp", steps=8, eval_every=8, record=RecordConfig.preset("minimal"),
                                 probes=(CallbackSpec(kind="sharpness", name="curv", every=2),),
                                 controllers=(CallbackSpec(kind="stability", every=2, options={"probe": "curv"}),))
    out = Trainer(cfg, root=root, progress=False).fit()
    wide = Run.open(out["path"]).scalars(["curv/stability_ratio", "stability/ratio"], wide=True).dropna()
    assert wide.index.tolist() == [2, 4, 6, 8]
    assert (wide["curv/stability_ratio"] == wide["stability/ratio"]).all()


class _Scripted(StabilityController):
    """The controller with its sharpness measurement replaced by a script of lambda values
    (ratio = lambda x eta / 2, plain SGD), so that the guards can be checked decision by decision."""

    def __init__(self, lambdas, **options):
        super().__init__(every=1, **options)
        self.lambdas = list(lambdas)

    def _measure(self, ctx):
        lam, lr = self.lambdas.pop(0), float(ctx.optimizer.param_groups[0]["lr"])
        return {"lambda_max": lam, "stability_threshold": 2 / lr, "stability_ratio": lam * lr / 2}


def _scripted_loop(ctl, losses, lrs=None):
    """A plain loop of len(losses) steps at the base lr 0.1 (or the schedule ``lrs``) whose
    reported losses are ``losses``; returns the loop's hooks (their run holds the decisions)."""
    model = nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = LoopHooks([ctl], model, opt, loss_fn=mse)
    hooks.start()
    for i, value in enumerate(losses):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[i]
        hooks.before_optimizer_step((X, Y), torch.tensor(value))
        hooks.after_optimizer_step()
    return hooks


def test_raise_is_held_once_the_sharpness_stops_following_the_lr():
    # lambda falls like 1 / eta (a scale-invariant network): the ratio stays at 0.2 whatever the lr
    ms = [1.0]
    lambdas = []
    for _ in range(8):
        lambdas.append(4.0 / ms[-1])  # ratio = (4 / m) x (0.1 m) / 2 = 0.2
        ms.append(min(ms[-1] * 1.25, 100.0))
    ctl = _Scripted(lambdas, loss_guard=False, anneal=0)
    hooks = _scripted_loop(ctl, [1.0] * 8)
    # raises while lambda >= 0.5 x 4: 4 / m >= 2 for m = 1, 1.25, 1.5625, 1.953 -> 4 raises (m = 2.44),
    # then 4 / 2.44 = 1.64 < 2: held for good
    assert ctl.state.multiplier == pytest.approx(1.25 ** 4) and ctl.state.changes == 4
    assert ctl.state.reference == 4.0 and ctl.state.holds == 4
    held = [d for d in hooks.run.decisions("stability") if d["message"].startswith("held")]
    assert len(held) == 1 and "does not follow" in held[0]["message"]  # consecutive holds: the first is written
    assert held[0]["data"]["evidence"]["reference"] == 4.0
    # without the guard the same script raises every time, to 1.25^8
    free = _Scripted(lambdas, follow=0, loss_guard=False, anneal=0)
    _scripted_loop(free, [1.0] * 8)
    assert free.state.multiplier == pytest.approx(1.25 ** 8) and free.state.holds == 0


def test_raise_is_held_while_the_training_loss_rises_and_lowering_never_is():
    # constant lambda 4 at eta 0.1: ratio 0.2, far below the band, asks for a raise every step
    losses = [2.0, 1.5, 1.0, 1.2, 1.4, 1.3, 0.5]
    ctl = _Scripted([4.0] * 7, anneal=0)
    _scripted_loop(ctl, losses)
    # window mean = that step's loss (every=1). Raise at step 1 (no earlier window), 2 and 3 (new lows),
    # hold at 4, 5 and 6 (1.2, 1.4, 1.3: none below the low 1.0), raise at 7 (0.5 < 1.0)
    assert ctl.state.changes == 4 and ctl.state.holds == 3 and ctl.state.window_loss == 0.5
    assert ctl.state.best_loss == 1.0 and ctl.state.multiplier == pytest.approx(1.25 ** 4)
    # a non-finite loss makes its window no new low (held) and is not kept as the low
    nan = _Scripted([4.0] * 3, anneal=0)
    _scripted_loop(nan, [2.0, float("nan"), 1.0])
    assert nan.state.changes == 2 and nan.state.holds == 1 and nan.state.best_loss == 2.0
    # above the band (lambda 40: ratio 2) the lr comes down even while the loss rises
    down = _Scripted([40.0] * 3, anneal=0)
    _scripted_loop(down, [1.0, 2.0, 3.0])
    assert down.state.multiplier == pytest.approx(0.8 ** 3) and down.state.holds == 0


def test_raise_is_held_while_the_schedule_anneals():
    lrs = [0.1, 0.1, 0.08, 0.06, 0.049, 0.03]  # the user's schedule; under 0.5 x 0.1 from the fifth step
    ctl = _Scripted([4.0] * 6, loss_guard=False)
    hooks = _scripted_loop(ctl, [1.0] * 6, lrs)
    assert ctl.state.schedule_peak == 0.1 and ctl.state.changes == 4 and ctl.state.holds == 2
    held = [d for d in hooks.run.decisions("stability") if d["message"].startswith("held")]
    assert len(held) == 1 and "anneals" in held[0]["message"]
    with pytest.raises(UsageError):
        StabilityController(follow=1.5)
    with pytest.raises(UsageError):
        StabilityController(anneal=2)


def test_defaults_do_not_run_the_lr_away_on_a_batchnorm_network(root):
    # The unguarded rule on mnist1d-cnn (BatchNorm, SGD with momentum) raises the lr to x14.6 by step
    # 150 while the sharpness falls like 1/eta (x100 and a loss at chance by step 300); the guards hold
    # it where the sharpness stopped following (x3.8 on this seed).
    def run(options):
        cfg = RunConfig.for_workload("mnist1d-cnn", steps=150, eval_every=150, record=RecordConfig.preset("minimal"),
                                     controllers=(CallbackSpec(kind="stability", options=options),))
        out = Trainer(cfg, root=root, progress=False).fit()
        ev = Run.open(out["path"]).events()
        states = [json.loads(d)["state"] for d in ev[ev["kind"] == KIND]["data"]]
        return states[-1], out

    guarded, out = run({})
    free, _ = run({"follow": 0, "loss_guard": False, "anneal": 0})
    assert free["multiplier"] > 8 and free["holds"] == 0
    assert guarded["multiplier"] < 5 and guarded["holds"] >= 1
    assert out["final"]["val_metric"] > 0.5
