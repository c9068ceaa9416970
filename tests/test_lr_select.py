"""Learning rate without a grid search: range test, curvature rule, early race, tune CLI."""

import json
import math

import pytest
import torch
from torch import nn

from trajscope.config import RecordConfig, RunConfig
from trajscope.controllers import curvature_lr as CL
from trajscope.controllers.lr_common import Compute, ShortLoop
from trajscope.controllers.lr_select import RESULT, select_lr
from trajscope.controllers.race import loss_slope, mean_cosine, race_decision, recent_loss
from trajscope.controllers.range_test import range_test
from trajscope.errors import UsageError
from trajscope.functional import lr_range
from trajscope.store import Run
from trajscope.cli import main


# ---- range test --------------------------------------------------------------------------------

def test_smoothing_matches_the_direct_weighted_sum():
    losses = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    beta = 0.7
    for t in range(1, len(losses) + 1):  # m_t / (1 - beta^t) = sum_k (1-beta) beta^(t-k) l_k / (1 - beta^t)
        ref = sum((1 - beta) * beta ** (t - k) * losses[k - 1] for k in range(1, t + 1)) / (1 - beta ** t)
        assert lr_range.smooth_losses(losses, beta)[t - 1] == pytest.approx(ref, rel=1e-12)


def test_steepest_descent_of_a_closed_form_curve():
    # s(r) = -tanh(2 (log r - log 0.03)) falls fastest at r = 0.03; the grid has 0.03 on it
    rates = lr_range.exponential_rates(3e-4, 3.0, 81)  # 20 points per decade: 0.03 is index 40
    s = [-math.tanh(2 * (math.log(r) - math.log(0.03))) for r in rates]
    assert lr_range.steepest_descent_index(rates, s) == 40
    assert lr_range.divergence_index([1.0, 0.5, 1.9, 2.1]) == 3 and lr_range.divergence_index([1.0, 0.9]) is None


def test_range_test_on_a_quadratic_follows_the_closed_form():
    """f(x) = lam x^2 / 2 and x <- x - eta lam x: the loss before update t is lam/2 (prod_{s<t}
    (1 - eta_s lam))^2 x0^2, and it first rises at the first rate above the divergence rate 2/lam."""
    lam, x = 4.0, [1.0]

    def step(t, lr):
        loss = 0.5 * lam * x[0] ** 2
        x[0] -= lr * lam * x[0]
        return loss

    res = range_test(step, 1e-3, 10.0, 60, beta=0.0, stop_factor=1e300)
    prod = 1.0
    for t, (lr, loss) in enumerate(zip(res.rates, res.losses)):
        assert loss == pytest.approx(0.5 * lam * prod ** 2, rel=1e-9)
        prod *= 1 - lr * lam
    g = lr_range.growth_factor(1e-3, 10.0, 60)
    assert 2 / lam < res.first_increase_lr <= 2 / lam * g * (1 + 1e-12)


def test_range_test_on_linear_regression_diverges_past_two_over_lambda():
    """Full-batch SGD on least squares (loss = mean of (w.x - y)^2 / 2, Hessian X^T X / n): every
    mode shrinks while eta < 2/lambda_max, so the loss cannot rise, nor the test stop, before."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.2])
    y = torch.randn(64, 1, generator=g)
    lam = float(torch.linalg.eigvalsh(x.T @ x / len(x))[-1])
    model = nn.Linear(5, 1, bias=False)
    cfg = RunConfig(workload="(model)", optimizer="sgd", batch_size=64, steps=100)
    loop = ShortLoop.for_model(model, lambda out, t: 0.5 * ((out - t) ** 2).sum(-1).mean(), x, y, cfg)
    res = range_test(loop.step, 1e-4, 10.0, 120)
    assert res.diverged_at is not None and res.first_increase_lr > 2 / lam
    assert res.rates[res.diverged_at] > 2 / lam
    assert res.lr < res.rates[res.diverged_at]  # the suggestion comes from the part before divergence
    assert loop.compute.steps == res.steps == len(res.losses)


# ---- curvature ---------------------------------------------------------------------------------

def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(24, 3, generator=torch.Generator().manual_seed(1))
    y = torch.arange(24) % 3
    return model, nn.functional.cross_entropy, x, y


def _full_hessian(model, loss_fn, x, y):
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params]).double()

    def f(flat):
        out, i = {}, 0
        for (name, _), s in zip(model.named_parameters(), shapes):
            n = math.prod(s)
            out[name] = flat[i:i + n].reshape(s)
            i += n
        return loss_fn(torch.func.functional_call(model.double(), out, (x.double(),)), y)

    h = torch.autograd.functional.hessian(f, flat0)
    model.float()
    return h


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_curvature_rule_against_the_full_hessian(optimizer):
    model, loss_fn, x, y = _tiny()
    cfg = RunConfig(workload="(model)", optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0,
                    batch_size=8, steps=100, lr=0.01)
    loop = ShortLoop.for_model(model, loss_fn, x, y, cfg)
    res = CL.curvature_select(loop, warmup=6, examples=24, tol=1e-8, max_iter=60)
    h = _full_hessian(loop.model, loss_fn, x, y)
    if optimizer == "adamw":
        from trajscope.functional.hessian import adam_preconditioner

        s = adam_preconditioner(loop.optimizer, list(loop.model.parameters())).double().rsqrt()
        h = s[:, None] * h * s[None, :]
        unit = (2 + 2 * 0.9) / (1 - 0.9)
    else:
        unit = 2 + 2 * 0.9
    lam = float(torch.linalg.eigvalsh(h)[-1])
    assert res["lambda"] == pytest.approx(lam, rel=1e-5)
    assert res["threshold_unit"] == pytest.approx(unit, rel=1e-12)
    assert res["lr"] == pytest.approx(CL.C_RATE * unit / lam, rel=1e-5)
    assert res["regimes"]["catapult"] == pytest.approx([unit / lam, 2 * unit / lam], rel=1e-5)
    assert res["warmup_steps"] == 6 and loop.compute.steps == 6 and res["regime"] == "stable"
    assert [CL.regime_of(r) for r in (0.5, 1.0, 3.0, 7.0)] == ["stable", "catapult", "catapult-relu", "divergent"]
    assert model[0].weight.grad is None  # the caller's model is untouched (a copy was trained)


def test_compute_step_equivalents():
    c = Compute(batch_size=64, steps=10, hvps=3, hvp_examples=128)
    assert c.step_equivalents == 10 + 2 * 3 * 128 / 64
    assert c.add(Compute(64, steps=5, hvps=1, hvp_examples=128)).step_equivalents == 15 + 2 * 4 * 2
    f = Compute(64, steps=2, forward_examples=96).add(Compute(64, forward_examples=96))
    assert f.forward_examples == 192 and f.step_equivalents == pytest.approx(2 + 192 / (3 * 64))


# ---- the race ----------------------------------------------------------------------------------

def test_race_rule():
    base = {"first_loss": 2.3, "val_loss": 1.0}
    cands = [{**base, "lr": 0.1, "loss": 1.00}, {**base, "lr": 0.2, "loss": 1.03},
             {**base, "lr": 0.4, "loss": 0.99, "stability_ratio": 2.5}, {"lr": 0.8, "diverged": True},
             {**base, "lr": 1.6, "loss": 2.5}]
    d = race_decision(cands, tol=0.05, key="loss")
    assert d["winner"] == 1 and d["keep"] == [1] and d["verdicts"][2].startswith("out: stability")
    assert d["verdicts"][3] == "out: diverged" and d["verdicts"][4].startswith("out: no progress")
    assert race_decision(cands, tol=0.01, key="loss")["winner"] == 0  # 1.03 is not within 1% of 1.00
    assert race_decision(cands, key="loss")["winner"] == 0  # the last iterate's default tie: 2%
    assert race_decision(cands, tol=0.01, key="val_loss")["winner"] == 1  # equal val losses: the larger rate
    with pytest.raises(UsageError):
        race_decision([{"lr": 1.0, "diverged": True}])
    assert loss_slope([math.exp(-0.1 * t) for t in range(20)]) == pytest.approx(-0.1)
    assert recent_loss([9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 2.0, 4.0]) == 3.0  # the last quarter: 2 of 8
    assert recent_loss([5.0, 7.0]) == 7.0
    assert mean_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])) == pytest.approx(
        (2 * (2 ** -0.5) + 0.0) / 3)


def _race_cfg(steps=60):
    return RunConfig.for_workload("digits-mlp", optimizer="sgd", momentum=0.9, steps=steps, eval_every=20,
                                  record=RecordConfig.preset("minimal"))


def test_early_race_continues_the_winner_bit_identically(tmp_path):
    from trajscope.train import Trainer

    cfg = _race_cfg()
    sel = select_lr(cfg, "early-race", root=tmp_path, progress=False, race_fraction=0.2, warmup=5, candidates=3,
                     sharpness=True, cooldown=0.025)
    at = sel.evidence["race_steps"]
    assert at == 12 and sel.run["status"] == "finished" and sel.run["steps"] == 60
    # the same steps as a plain run at the winning rate (no race controller, never stopped)
    plain = Trainer(cfg.model_copy(update={"lr": sel.lr}), root=tmp_path / "plain", progress=False).fit()
    a, b = Run.open(sel.run["path"]), Run.open(plain["path"])
    try:
        sa, sb = a.load_state(60, "checkpoint")["model"], b.load_state(60, "checkpoint")["model"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        la = a.scalars(["loss"], wide=True)["loss"]
        lb = b.scalars(["loss"], wide=True)["loss"]
        assert la.tolist() == lb.tolist()
        # the decision is in the run: the result and a controller event at the race's end
        data, _ = a.load_result(RESULT)
        assert data["lr"] == sel.lr and data["method"] == "early-race"
        ev = a.events()
        dec = [json.loads(d) for d in ev[ev["kind"] == "controller"]["data"]]
        assert any(d["controller"] == "early-race" and d["evidence"]["winner"] == sel.evidence["winner"] for d in dec)
    finally:
        a.close(), b.close()
    # compute accounting: curvature warm-up + the losers' race steps; HVPs of the curvature and race
    losers = [r for i, r in enumerate(sel.extra["race_runs"]) if i != sel.evidence["winner"]]
    loser_steps = 0
    for rid in losers:
        r = Run.open(tmp_path / rid)
        try:
            assert r.status == "stopped"
            loser_steps += r.last_step()
        finally:
            r.close()
    assert loser_steps == 2 * at
    curv = sel.evidence["curvature"]
    cool = sum(c["cool_steps"] for c in sel.evidence["candidates"])
    assert sel.choose.steps == curv["warmup_steps"] + loser_steps + cool
    race_hvps = sum(c["hvps"] for c in sel.evidence["candidates"])
    assert race_hvps > 0 and sel.choose.hvps == curv["hvps"] + race_hvps
    # each candidate's rung evaluation (its only rung is the last): the averaged iterate and the
    # cooled copy, each on 512 training examples (a multiple of the batch size), forward only, a
    # third of a step per batch of examples; no validation pass. The cooldown branch: 5 steps
    # (2.5% of 60, at least MIN_RUNG) per candidate, the winner's included (they are not training)
    assert all(c["forward_examples"] == 1024 and c["val_loss"] is None and c["cool_steps"] == 5
               for c in sel.evidence["candidates"])
    assert sel.choose.forward_examples == 3 * 1024
    w = sel.evidence["winner"]  # ranked by the loss after the cooldown
    assert sel.evidence["candidates"][w]["cool_loss"] == min(c["cool_loss"] for c in sel.evidence["candidates"])
    assert sel.evidence["rung_decisions"][-1]["key"] == "cool_loss"
    # by hand: 5 warm-up steps + 2 losers x 12 steps + 3 x 5 cooldown steps, 2 x HVPs x 64
    # examples / 64, 3 x 1024 / (3 x 64) = 16
    assert sel.choose.steps == 5 + 24 + 15 and sel.choose.hvp_examples == 64
    assert sel.choose.step_equivalents == pytest.approx(44 + 2 * sel.choose.hvps + 16)
    assert sel.total_step_equivalents == pytest.approx(44 + 2 * sel.choose.hvps + 16 + 60)
    # a second call reads the candidates from the store instead of training them again
    again = select_lr(cfg, "early-race", root=tmp_path, progress=False, race_fraction=0.2, warmup=5, candidates=3,
                     sharpness=True, cooldown=0.025)
    assert again.lr == sel.lr and again.run["run_id"] == sel.run["run_id"]


def test_successive_halving_race_resumes_through_rungs_bit_identically(tmp_path):
    from trajscope.train import Trainer

    cfg = _race_cfg()
    sel = select_lr(cfg, "early-race", root=tmp_path, progress=False, rungs=(0.1, 0.25), candidates=4, warmup=5,
                     sharpness=True)
    ev = sel.evidence
    assert ev["rungs"] == [6, 15] and sel.run["status"] == "finished" and sel.run["steps"] == 60
    first, second = ev["rung_decisions"]
    assert len(first["candidates"]) == 4 and len(first["kept"]) == 2 and len(second["kept"]) == 1
    assert second["kept"][0] == ev["winner"] and ev["winner"] in first["kept"]
    # the sharpness (asked for) is measured at the last rung only
    assert all(c["stability_ratio"] is None and c["hvps"] == 0 for c in first["candidates"])
    assert all(c["hvps"] > 0 for c in second["candidates"])
    plain = Trainer(cfg.model_copy(update={"lr": sel.lr}), root=tmp_path / "plain", progress=False).fit()
    a, b = Run.open(sel.run["path"]), Run.open(plain["path"])
    try:
        sa, sb = a.load_state(60, "checkpoint")["model"], b.load_state(60, "checkpoint")["model"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.scalars(["loss"], wide=True)["loss"].tolist() == b.scalars(["loss"], wide=True)["loss"].tolist()
    finally:
        a.close(), b.close()
    # each loser ran to the rung it lost at: two at step 6, one at step 15
    steps = []
    for i, rid in enumerate(sel.extra["race_runs"]):
        if i == ev["winner"]:
            continue
        r = Run.open(tmp_path / rid)
        try:
            assert r.status == "stopped"
            steps.append(r.last_step())
        finally:
            r.close()
    assert sorted(steps) == [6, 6, 15] and sorted(ev["losers_steps"].values()) == [6, 6, 15]
    # losers 6 + 6 + 15 steps; no cooldown by default: every rung ranked by the averaged iterate
    assert all(c["cool_steps"] == 0 and c["cool_loss"] is None for c in first["candidates"] + second["candidates"])
    assert first["key"] == second["key"] == "avg_loss"
    assert sel.choose.steps == ev["curvature"]["warmup_steps"] + 27
    race_hvps = sum(c["hvps"] for c in second["candidates"])
    assert sel.choose.hvps == ev["curvature"]["hvps"] + race_hvps
    # a second call reads every candidate from the store (nothing trained again)
    again = select_lr(cfg, "early-race", root=tmp_path, progress=False, rungs=(0.1, 0.25), candidates=4, warmup=5,
                     sharpness=True)
    assert again.lr == sel.lr and again.run["run_id"] == sel.run["run_id"]
    assert again.choose.steps == sel.choose.steps
    # ... and reports the seconds the runs took when they were trained, read from the store: each
    # loser's summed over its resumes, the winner's up to the last rung plus the segment after it
    walls = ev["losers_wall_s"]
    assert again.evidence["losers_wall_s"] == walls and all(w > 0 for w in walls.values())
    late = next(int(i) for i, s in ev["losers_steps"].items() if s == 15)  # resumed at step 6
    assert walls[str(late)] > first["candidates"][late]["wall_s"] > 0
    w_at_15 = second["candidates"][first["kept"].index(ev["winner"])]["wall_s"]
    assert again.train_wall_s == pytest.approx(sel.train_wall_s) and sel.train_wall_s > w_at_15 > 0


def test_race_rule_default_tie_tolerance_is_two_percent():
    """The default tie (2%, race.py's docstring) on measured rung losses: the benchmark's
    mnist1d-cnn AdamW last rung (3.4% apart) goes to the lower loss, the grid's mnist1d-mlp SGD
    last rung (1.5% apart) to the larger rate; the tolerance's edge on both sides."""
    base = {"first_loss": 2.34, "val_loss": 1.0}
    cnn = [{**base, "lr": 0.0622, "loss": 1.3275}, {**base, "lr": 0.0311, "loss": 1.1603},
           {**base, "lr": 0.0155, "loss": 1.1223}]
    assert race_decision(cnn, key="loss")["lr"] == 0.0155
    assert race_decision(cnn, tol=0.05, key="loss")["lr"] == 0.0311  # the rule up to 0b6a864
    mlp = [{**base, "lr": 0.125, "loss": 1.365}, {**base, "lr": 0.25, "loss": 1.385}]
    assert race_decision(mlp, key="loss")["lr"] == 0.25
    assert race_decision(mlp, tol=0.01, key="loss")["lr"] == 0.125
    edge = [{**base, "lr": 0.1, "loss": 1.0}, {**base, "lr": 0.2, "loss": 1.0199}, {**base, "lr": 0.4, "loss": 1.0201}]
    d = race_decision(edge, keep=3, key="loss")
    assert d["keep"] == [1, 0, 2] and "2 within 2%" in d["reason"]


def test_subset_loss_matches_the_direct_mean_and_leaves_the_model_alone():
    """Train-mode loss on chunks of the batch size (BatchNorm on each chunk's statistics), weighted
    by chunk size, with the parameters replaced by a flat vector: against a deep copy loaded with
    those parameters; the model's parameters, running statistics and the random state unchanged."""
    import copy

    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from trajscope.controllers.race import subset_loss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.3), nn.Linear(5, 2))
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    theta = parameters_to_vector(model.parameters()).detach() + 0.1 * torch.randn(sum(p.numel() for p in model.parameters()))
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    got = subset_loss(model, nn.functional.cross_entropy, x, y, 16, theta)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ref_model = copy.deepcopy(model)
    vector_to_parameters(theta, ref_model.parameters())
    model[3].p = ref_model[3].p = 0.0  # dropout off, so that the reference draws the same (no) masks
    got = subset_loss(model, nn.functional.cross_entropy, x, y, 16, theta)
    with torch.no_grad():  # chunks of 16, 16 and 8, each on a fresh copy (its own batch statistics)
        ref = sum(float(nn.functional.cross_entropy(copy.deepcopy(ref_model).train()(x[i:i + 16]), y[i:i + 16]))
                  * len(x[i:i + 16]) for i in (0, 16, 32))
    assert got == pytest.approx(ref / 40, rel=1e-6)
    assert subset_loss(model, nn.functional.cross_entropy, x, y, 16) != pytest.approx(got, rel=1e-3)
    model.eval()
    subset_loss(model, nn.functional.cross_entropy, x, y, 16)
    assert not model.training  # the mode is restored


def test_race_evidence_averages_the_last_quarter_of_iterates(tmp_path):
    """avg_loss at rung k: the loss (subset_loss on the first 512 training examples) of the mean of
    theta_j, j = tail_start(k)..k, against the iterates of a plain run captured step by step; with
    rungs 8 and 9 the second window (steps 8, 9) spans the stop and resume at step 8."""
    from torch.nn.utils import parameters_to_vector

    from trajscope import workloads
    from trajscope.controllers.race import subset_loss, tail_start
    from trajscope.controllers.race_run import _read, race_config
    from trajscope.events import Callback
    from trajscope.train import Trainer

    assert [tail_start(k) for k in (1, 4, 8, 9, 20)] == [1, 4, 7, 8, 16]
    cfg = _race_cfg(20).model_copy(update={"lr": 0.1})

    class Capture(Callback):
        thetas: dict = {}

        def on_step_end(self, ctx):
            self.thetas[ctx.step] = parameters_to_vector(ctx.model.parameters()).detach().clone()

    cap = Capture()
    Trainer(cfg.model_copy(update={"steps": 9}), root=tmp_path / "plain", callbacks=[cap], progress=False).fit()
    rc = race_config(cfg, 0.1, [8, 9], 128)
    first = Trainer(rc, root=tmp_path, progress=False).fit()
    assert first["status"] == "stopped" and first["steps"] == 8
    Trainer(rc, root=tmp_path, resume=True, progress=False).fit()
    ev = _read(first["path"])["evidence"]
    wl = workloads.get("digits-mlp")
    data = wl.make_data(cfg.seed, cfg.workload_options)
    torch.manual_seed(cfg.seed)
    model = wl.make_model(cfg.workload_options)
    for k, steps in ((8, (7, 8)), (9, (8, 9))):
        avg = torch.stack([cap.thetas[j] for j in steps]).mean(0)
        ref = subset_loss(model, wl.loss_fn, data.x_train[:512], data.y_train[:512], 128, avg)
        assert ev[k]["avg_loss"] == pytest.approx(ref, rel=1e-5)
        last = subset_loss(model, wl.loss_fn, data.x_train[:512], data.y_train[:512], 128, cap.thetas[k])
        assert ev[k]["avg_loss"] != pytest.approx(last, rel=1e-4)  # the average, not the last iterate


def test_race_refuses_stored_candidates_without_the_ranking_evidence():
    from trajscope.controllers.race_run import _rung_evidence

    old = {"status": "stopped", "run_id": "abc", "evidence": {8: {"loss": 1.0, "val_loss": 1.1}}}
    with pytest.raises(UsageError, match="older trajscope"):
        _rung_evidence(0.1, old, 8, "avg_loss")
    assert _rung_evidence(0.1, old, 8, "loss") == {"loss": 1.0, "val_loss": 1.1, "lr": 0.1, "steps": 8}


def test_race_rule_keeps_the_tied_largest_rates_first():
    base = {"first_loss": 2.3, "val_loss": 1.0}
    cands = [{**base, "lr": 0.1, "loss": 1.00}, {**base, "lr": 0.2, "loss": 1.04},
             {**base, "lr": 0.4, "loss": 1.20}, {**base, "lr": 0.8, "loss": 0.9, "diverged": True}]
    d = race_decision(cands, tol=0.05, keep=2, key="loss")
    assert d["keep"] == [1, 0] and d["winner"] == 1 and d["verdicts"][3] == "out: diverged"
    assert race_decision(cands, tol=0.5, keep=3, key="loss")["keep"] == [2, 1, 0]
    assert race_decision(cands, tol=0.0, keep=3, key="loss")["keep"] == [0, 1, 2]  # no tie: by training loss
    with pytest.raises(UsageError):
        race_decision(cands, keep=0)


def test_range_test_and_curvature_store_their_decision(tmp_path):
    cfg = _race_cfg(40)
    for method in ("range-test", "curvature"):
        sel = select_lr(cfg, method, root=tmp_path, progress=False)
        assert sel.run["steps"] == 40 and sel.total_step_equivalents == pytest.approx(sel.choose.step_equivalents + 40)
        r = Run.open(sel.run["path"])
        try:
            assert r.load_result(RESULT)[0]["lr"] == sel.lr
            assert r.config["lr"] == sel.lr
        finally:
            r.close()


def test_bad_input_is_one_line(capsys):
    with pytest.raises(UsageError, match="unknown method"):
        select_lr("digits-mlp", "grid")
    with pytest.raises(UsageError, match="unknown workload"):
        select_lr("nope", "curvature")
    with pytest.raises(UsageError, match="early-race trains runs"):
        select_lr(nn.Linear(2, 2), "early-race", loss_fn=nn.functional.mse_loss, data=(torch.zeros(4, 2),) * 2)
    with pytest.raises(UsageError, match="option of method"):
        select_lr("digits-mlp", "curvature", range_steps=3)
    for args in (["tune", "nope", "--method", "curvature"], ["tune", "digits-mlp", "--method", "bogus"],
                 ["tune", "digits-mlp", "--executor", "dask"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("trajscope: error: unknown")
    for args, msg in ((["tune", "digits-mlp", "--method", "curvature", "--cooldown", "0.025"], "applies to"),
                      (["tune", "digits-mlp", "--cooldown", "1.5", "--steps", "20"], "cooldown must be")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and msg in err


def test_tune_cli_json(tmp_path, capsys):
    rc = main(["tune", "digits-mlp", "--method", "curvature", "--steps", "30", "--record", "minimal",
               "--root", str(tmp_path), "--no-progress", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {"method", "lr", "optimizer", "workload", "budget", "choose", "evidence", "reason", "run", "train_steps",
            "total_step_equivalents", "total_wall_s"} <= set(out)
    assert {"steps", "hvps", "hvp_examples", "wall_s", "step_equivalents"} <= set(out["choose"])
    assert out["run"]["status"] == "finished" and out["evidence"]["lambda"] > 0
    # the race with its opt-in cooldown: the last rung ranked after 5 cooldown steps per candidate
    rc = main(["tune", "digits-mlp", "--steps", "40", "--record", "minimal", "--cooldown", "0.025",
               "--root", str(tmp_path / "race"), "--no-progress", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    last = out["evidence"]["rung_decisions"][-1]
    assert last["key"] == "cool_loss" and all(c["cool_steps"] == 5 for c in last["candidates"])


@pytest.mark.parametrize("optimizer,lr", [("prodigy", 1.0), ("schedulefree", 0.0025)])
def test_lr_free_optimizers_train_and_resume_identically(tmp_path, optimizer, lr):
    from trajscope.train import Trainer

    cfg = RunConfig.for_workload("digits-mlp", optimizer=optimizer, lr=lr, steps=20, eval_every=5,
                                 record=RecordConfig(snapshots="none", sketch_dim=0, checkpoint_every=10))
    full = Trainer(cfg, root=tmp_path / "a", progress=False).fit()
    assert full["status"] == "finished" and math.isfinite(full["final"]["val_loss"])
    # a callback stops the run after step 10; resume it: the same final weights as the uninterrupted run
    part = Trainer(cfg, root=tmp_path / "b", progress=False, callbacks=[_StopAt(10)]).fit()
    assert part["status"] == "stopped" and part["steps"] == 10
    done = Trainer(cfg, root=tmp_path / "b", progress=False, resume=True).fit()
    a, b = Run.open(full["path"]), Run.open(done["path"])
    try:
        sa, sb = a.load_state(20, "checkpoint")["model"], b.load_state(20, "checkpoint")["model"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.scalars(["val_metric"], wide=True)["val_metric"].tolist() == \
            b.scalars(["val_metric"], wide=True)["val_metric"].tolist()
    finally:
        a.close(), b.close()


def test_prodigy_keeps_stdout_clean(capsys):
    """Prodigy prints a note when its weight decay is decoupled; a --json command's stdout must stay
    one JSON object, so the note goes to stderr."""
    from trajscope.train.optim import make_optimizer

    cfg = RunConfig.for_workload("digits-mlp", optimizer="prodigy", lr=1.0, weight_decay=0.01)
    opt = make_optimizer(nn.Linear(3, 2), cfg)
    out, err = capsys.readouterr()
    assert type(opt).__name__ == "Prodigy" and out == "" and "decoupled" in err


class _StopAt:
    name = "stop-at"

    def __init__(self, at):
        self.at, self.stop_requested = at, False

    def on_event(self, event, ctx):
        if event.value == "step_end" and ctx.step == self.at:
            self.stop_requested = True

    def state_dict(self):
        return {}


def test_select_lr_on_a_plain_model():
    model, loss_fn, x, y = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    cur = select_lr(model, "curvature", loss_fn=loss_fn, data=(x, y), optimizer="sgd", momentum=0.9, batch_size=8,
                    steps=200, warmup=5, examples=24)
    assert cur.run is None and cur.lr == pytest.approx(0.5 * 3.8 / cur.evidence["lambda"])
    assert cur.choose.steps == 5 and cur.choose.hvp_examples == 24
    rt = select_lr(model, "range-test", loss_fn=loss_fn, data=(x, y), optimizer="sgd", batch_size=8, range_steps=40)
    assert rt.run is None and rt.choose.steps == rt.evidence["steps"] <= 40
    assert rt.lr in rt.evidence["rates"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the caller's model is unchanged


def test_a_diverging_warmup_is_a_one_line_error():
    from trajscope.errors import TrajscopeError

    # least squares at 1000/16 of the stability threshold: |1 - eta lam| ~ 125 per step overflows float32
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    cfg = RunConfig(workload="(model)", optimizer="sgd", batch_size=32, steps=100)
    loop = ShortLoop.for_model(nn.Linear(4, 1), lambda out, t: 0.5 * ((out - t) ** 2).mean(), x, x[:, :1], cfg)
    with pytest.raises(TrajscopeError, match="warm-up diverged") as e:
        CL.curvature_select(loop, warmup=60, examples=32, c_warmup=1e3)
    assert "\n" not in str(e.value)


# ---- the benchmark's seed-robust view ------------------------------------------------------------
def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lr_selection.py"
    spec = importlib.util.spec_from_file_location("lr_selection_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_confirm_seeds_reruns_the_chosen_rates_on_fresh_seeds(tmp_path):
    from trajscope.train import Trainer

    B = _bench()
    budgets = {"digits-mlp": 20}
    rows = [{"workload": "digits-mlp", "optimizer": opt, "method": m, "lr": lr, "final_metric": 0.5}
            for opt, rates in (("sgd", (0.1, 0.3, 0.1)), ("adamw", (0.01, 0.003, float("nan"))))
            for m, lr in zip(("grid",) + B.TRAJSCOPE, rates)]
    confirm = B.confirm_seeds(rows, budgets, str(tmp_path / "runs"), 2, say=lambda e: None)
    assert [(e["optimizer"], e["seeds"]) for e in confirm] == [("sgd", [1, 2]), ("adamw", [1, 2])]
    # the slow reference: a plain run of the same config and fresh seed, in another root
    for e in confirm:
        for m in ("grid", "curvature"):
            cfg = B.base("digits-mlp", e["optimizer"], 20).model_copy(update={"lr": e[m]["lr"], "seed": 2})
            ref = Trainer(cfg, root=tmp_path / "ref", progress=False).fit()
            assert e[m]["finals"][1] == ref["final"]["val_metric"]
            assert e[m]["mean"] == pytest.approx(sum(e[m]["finals"]) / 2)
    sgd, adamw = confirm
    assert sgd["early-race"]["finals"] == sgd["grid"]["finals"]  # the same rate: the same runs
    assert sgd["within"]["early-race"] and math.isnan(adamw["early-race"]["mean"])
    assert not adamw["within"]["early-race"]  # a method that chose nothing is never within
    assert B._final_or_zero({"status": "diverged", "final": {"val_metric": 0.9}}) == 0.0


def test_confirm_summary_counts_pairs_and_workloads_on_the_means():
    B = _bench()

    def entry(wl, opt, grid, curv, race):
        e = {"workload": wl, "optimizer": opt, "grid": {"mean": grid}}
        e.update({m: {"mean": v} for m, v in zip(B.TRAJSCOPE, (curv, race))})
        e["within"] = {m: B.within(e[m]["mean"], grid) for m in B.TRAJSCOPE}
        return e

    # 0.5 points below the grid rate's mean is within (as in the single-seed summary); 0.6 is not
    confirm = [entry("a", "sgd", 0.90, 0.895, 0.894), entry("a", "adamw", 0.80, 0.81, 0.80),
               entry("b", "sgd", 0.70, 0.60, 0.70), entry("b", "adamw", 0.70, 0.70, 0.70)]
    assert B.within(0.895, 0.90) and not B.within(0.894, 0.90) and not B.within(float("nan"), 0.9)
    s = B.summarize_confirm(confirm, {"a": 10, "b": 10}, 3)
    assert s["methods"]["curvature"] == {"within_pairs": 3, "workloads_within_target": 1, "pairs": 4}
    assert s["methods"]["early-race"] == {"within_pairs": 3, "workloads_within_target": 1, "pairs": 4}
    assert s["n"] == 3 and s["best_method"] in B.TRAJSCOPE and s["workloads_within_target"] == 1


def test_race_validation_pass_only_where_it_ranks(tmp_path):
    """key="val_loss" evaluates the validation set at each rung and counts it; other keys do not."""
    from trajscope import workloads

    cfg = _race_cfg(40)
    n_val = len(workloads.get("digits-mlp").make_data(cfg.seed, cfg.workload_options).x_val)
    runs = {}
    for key in ("avg_loss", "val_loss"):
        runs[key] = select_lr(cfg, "early-race", root=tmp_path / key, progress=False, race_fraction=0.25, warmup=5,
                              candidates=2, key=key, train=False)
    plain, val = runs["avg_loss"], runs["val_loss"]
    assert all(c["val_loss"] is None and c["val_metric"] is None for c in plain.evidence["candidates"])
    assert all(math.isfinite(c["val_loss"]) and 0 <= c["val_metric"] <= 1 for c in val.evidence["candidates"])
    # the same trajectories (the validation pass is eval mode, no grad): the same training losses
    assert [c["loss"] for c in plain.evidence["candidates"]] == [c["loss"] for c in val.evidence["candidates"]]
    assert plain.choose.forward_examples == 2 * 512 and val.choose.forward_examples == 2 * (512 + n_val)
    assert val.choose.step_equivalents - plain.choose.step_equivalents == pytest.approx(2 * n_val / (3 * 64))


def test_race_rule_without_a_validation_pass():
    """Candidates without val_loss are ranked on the training evidence; a non-finite one is out."""
    cands = [{"lr": 0.1, "first_loss": 2.3, "loss": 1.0, "avg_loss": 0.9, "val_loss": None},
             {"lr": 0.2, "first_loss": 2.3, "loss": 1.0, "avg_loss": 0.8, "val_loss": None},
             {"lr": 0.4, "first_loss": 2.3, "loss": float("nan"), "avg_loss": 0.5, "val_loss": None}]
    d = race_decision(cands, keep=2)
    assert d["keep"] == [1, 0] and d["verdicts"][2] == "out: diverged"
    # a measured non-finite validation loss still counts as diverged
    d = race_decision([{**cands[0], "val_loss": float("inf")}, cands[1]])
    assert d["winner"] == 1 and d["verdicts"][0] == "out: diverged"


# ---- the benchmark's independent studies ---------------------------------------------------------
def test_grid_rates_rotate_per_study():
    """Study 0 is the Halton grid; study k shifts every point's log-position by k x golden ratio mod 1."""
    B = _bench()
    lo, hi = B.GRID_RANGE["sgd"]
    assert B.grid_rates("sgd") == pytest.approx([lo * (hi / lo) ** u for u in (0.5, 0.25, 0.75, 0.125, 0.625)])
    phi = (5 ** 0.5 - 1) / 2
    for k in (1, 2):
        pos = [math.log(r / lo) / math.log(hi / lo) for r in B.grid_rates("sgd", study=k)]
        want = [(u + k * phi) % 1.0 for u in (0.5, 0.25, 0.75, 0.125, 0.625)]
        assert pos == pytest.approx(want, abs=1e-12)
        assert all(lo <= r < hi for r in B.grid_rates("sgd", study=k))


def test_median_counts_never_as_infinite():
    B = _bench()
    inf = float("inf")
    assert B.median([3.0, 1.0, 2.0]) == 2.0 and B.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert B.median([inf, 100.0, 300.0]) == 300.0 and B.median([inf, inf, 300.0]) == inf
    assert math.isnan(B.median([]))


def test_studies_summary_takes_medians_over_studies():
    B = _bench()

    def rows(grid, curv, race, race_steps, prodigy_steps):
        out = []
        for opt, g, c, r in zip(("sgd", "adamw"), grid, curv, race):
            out += [{"workload": "w", "optimizer": opt, "method": "grid", "lr": 0.1, "final_metric": g,
                     "total_steps": 500, "steps_to_target": 50},
                    {"workload": "w", "optimizer": opt, "method": "curvature", "lr": 0.1, "final_metric": c,
                     "total_steps": 110, "steps_to_target": None},
                    {"workload": "w", "optimizer": opt, "method": "early-race", "lr": 0.1, "final_metric": r,
                     "total_steps": 140, "steps_to_target": race_steps if opt == "sgd" else None}]
        out += [{"workload": "w", "optimizer": n, "method": n, "lr": 1.0, "final_metric": 0.5, "total_steps": 100,
                 "steps_to_target": s} for n, s in (("prodigy", prodigy_steps), ("schedulefree", None))]
        return out

    nan = float("nan")
    studies = [rows((0.90, 0.80), (0.90, nan), (0.89, 0.80), 60, 70),   # race 1 point under on sgd
               rows((0.92, 0.82), (0.70, nan), (0.92, 0.81), 80, 75),   # curvature failed on adamw: 0
               rows((0.91, 0.81), (0.91, 0.81), (0.91, 0.82), 90, None)]
    s = B.summarize_studies(studies, {"w": 100})
    sgd, adamw = s["pairs"]
    assert sgd["grid"]["median"] == 0.91 and sgd["early-race"]["median"] == 0.91 and adamw["grid"]["median"] == 0.81
    assert adamw["curvature"]["finals"] == [0.0, 0.0, 0.81] and adamw["curvature"]["median"] == 0.0
    assert sgd["within"] == {"curvature": False, "early-race": True}  # curvature: median 0.90, 1 point under
    assert adamw["within"]["early-race"] and not adamw["within"]["curvature"]
    race = s["methods"]["early-race"]
    assert race["within_pairs"] == 2 and race["workloads_within_target"] == 1
    # steps to target: the race's median 80 (sgd), Prodigy's median of (70, 75, never) 75, schedule-free never
    assert sgd["early-race"]["steps_to_target"] == 80 and adamw["early-race"]["steps_to_target"] == float("inf")
    assert s["lr_free_steps_to_target"] == {"w": {"prodigy": 75, "schedulefree": float("inf")}}
    assert race["beats_lr_free"] == 0 and s["methods"]["curvature"]["beats_lr_free"] == 0
    assert s["grid_best_beats_lr_free"] == 1  # the grid's best trial's own 50 steps < 75
    faster = [[{**r, "steps_to_target": 100} if r["method"] == "prodigy" else r for r in rows] for rows in studies]
    assert B.summarize_studies(faster, {"w": 100})["methods"]["early-race"]["beats_lr_free"] == 1  # 80 < 100
    slow_grid = [[{**r, "steps_to_target": 75} if r["method"] == "grid" else r for r in rows] for rows in studies]
    assert B.summarize_studies(slow_grid, {"w": 100})["grid_best_beats_lr_free"] == 0  # a tie is no win
    assert race["compute_ratio"] == pytest.approx(1.4) and s["methods"]["curvature"]["compute_ratio"] == pytest.approx(1.1)
    assert s["best_method"] == "early-race" and s["n"] == 3 and s["workloads_within_target"] == 1


def test_bench_workload_study_reseeds_every_run(monkeypatch):
    """A study k > 0 trains every run (grid, methods, Prodigy, schedule-free) on the config's seed + k,
    the grid on its rotated rates; study 0 on the config's own seed and the Halton rates."""
    import trajscope
    import trajscope.sweep

    B = _bench()
    seen = []

    def fake_runs(configs, **kw):
        seen.extend((c.seed, c.optimizer, c.lr) for c in configs)
        return [{"status": "finished", "final": {"val_metric": 0.5}, "steps": c.steps} for c in configs]

    class Sel:
        lr, reason, run, total_wall_s = 0.1, "r", {"status": "finished", "final": {"val_metric": 0.5}, "steps": 10}, 0.0

        class choose:
            step_equivalents, wall_s = 1.0, 0.0

    def fake_select(cfg, method, **kw):
        seen.append((cfg.seed, method, None))
        return Sel

    monkeypatch.setattr(trajscope.sweep, "run_configs", fake_runs)
    monkeypatch.setattr(trajscope, "select_lr", fake_select)
    for k in (0, 2):
        seen.clear()
        B.bench_workload("digits-mlp", 10, "unused", lambda r: None, study=k)
        assert {s for s, _, _ in seen} == {k}
        assert [lr for s, o, lr in seen if o == "sgd"] == B.grid_rates("sgd", study=k)
        assert {o for _, o, _ in seen} >= {"prodigy", "schedulefree", "early-race", "curvature", "range-test"}


# ---- the last rung's cooldown branch -------------------------------------------------------------
def _ctx_after(cfg, steps):
    """A StepContext of a digits-mlp run after ``steps`` Trainer-order steps (the Trainer's batches)."""
    from trajscope import workloads
    from trajscope.events import StepContext
    from trajscope.train.optim import make_optimizer
    from trajscope.train.trainer import BatchSampler

    wl = workloads.get(cfg.workload)
    data = wl.make_data(cfg.seed, cfg.workload_options)
    torch.manual_seed(cfg.seed)
    model = wl.make_model(cfg.workload_options)
    opt = make_optimizer(model, cfg)
    sampler = BatchSampler(len(data.x_train), cfg.batch_size, cfg.seed)
    for s in range(1, steps + 1):
        idx = sampler.indices(s)
        wl.loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return StepContext(cfg, None, model, opt, wl, data, step=steps), sampler


def test_cooled_loss_matches_a_hand_written_cooldown():
    """Plain SGD: the branch is theta_j = theta_{j-1} - lr (1 - (j-1)/m) g_j on the run's next
    batches, then the subset loss; the reference writes the updates by hand on a copy."""
    import copy

    from trajscope.controllers.race import cooled_loss, subset_loss

    cfg = RunConfig.for_workload("digits-mlp", optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.3, steps=40)
    ctx, sampler = _ctx_after(cfg, 7)
    for g in ctx.optimizer.param_groups:
        g["lr"] = 0.2  # the rate at the rung
    x, y = ctx.data.x_train[:128], ctx.data.y_train[:128]
    got = cooled_loss(ctx, 4, x, y, 64)
    ref = copy.deepcopy(ctx.model)
    for j in range(1, 5):
        idx = sampler.indices(7 + j)
        loss = ctx.loss_fn(ref(ctx.data.x_train[idx]), ctx.data.y_train[idx])
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads):
                p -= 0.2 * (1 - (j - 1) / 4) * g
    assert got == pytest.approx(subset_loss(ref, ctx.loss_fn, x, y, 64), rel=1e-5)
    # a zero-length cooldown is the subset loss of the run as it is (the same model)
    assert cooled_loss(ctx, 0, x, y, 64) == pytest.approx(subset_loss(ctx.model, ctx.loss_fn, x, y, 64), rel=1e-6)


def test_cooled_loss_leaves_the_run_untouched():
    """With momentum (and AdamW's moments) the branch works on deep copies: the run's weights,
    buffers, optimizer state, learning rates and random state are exactly as before."""
    from trajscope.controllers.race import cooled_loss

    for opt in ("sgd", "adamw"):
        cfg = RunConfig.for_workload("digits-mlp", optimizer=opt, momentum=0.9 if opt == "sgd" else 0.0, steps=40)
        ctx, _ = _ctx_after(cfg, 5)
        params = [p.detach().clone() for p in ctx.model.parameters()]
        state = [v.clone() for s in ctx.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        rates = [g["lr"] for g in ctx.optimizer.param_groups]
        rng = torch.get_rng_state()
        loss = cooled_loss(ctx, 5, ctx.data.x_train[:64], ctx.data.y_train[:64], 64)
        assert math.isfinite(loss)
        assert all(torch.equal(a, b) for a, b in zip(params, ctx.model.parameters()))
        after = [v for s in ctx.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        assert len(after) == len(state) and all(torch.equal(a, b) for a, b in zip(state, after))
        assert [g["lr"] for g in ctx.optimizer.param_groups] == rates and torch.equal(torch.get_rng_state(), rng)


def test_cooldown_steps_and_bad_fraction():
    from trajscope.controllers.race_run import cooldown_steps

    assert cooldown_steps(800, 0.025) == 20 and cooldown_steps(60, 0.025) == 5 and cooldown_steps(800, 0) == 0
    with pytest.raises(UsageError, match="cooldown"):
        cooldown_steps(800, 1.5)
