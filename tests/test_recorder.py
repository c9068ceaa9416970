import math

import pytest
import torch
from torch import nn

import trajscope
from trajscope import schedules as S
from trajscope.errors import DivergedError
from trajscope.functional.sketch import Sketcher
from trajscope.record import capture, restore
from trajscope.store import Run


def _loop(model, opt, rec, steps, seed=0, lr_bomb_at=None):
    g = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        x = torch.randn(16, 5, generator=g)
        y = x.sum(1, keepdim=True)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        if lr_bomb_at is not None and t == lr_bomb_at:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        rec.step(loss=loss, optimizer=opt)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))


def test_three_line_plain_loop_records_everything_on_schedule(root):
    model = _model()
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}],
                          lr=0.1, momentum=0.9)
    run = trajscope.Run.create(root, config={"lr": 0.1}, seed=0)
    thetas = [torch.cat([p.detach().flatten().clone() for p in model.parameters()])]
    with trajscope.Recorder(model, run, snapshots=S.until(3) | S.every(10), params="0.*",
                            grads=S.at([5]), optimizer_state=S.at([5]), checkpoints=S.at([12]),
                            sketch_dim=64, commit_every_s=0) as rec:
        g = torch.Generator().manual_seed(0)
        grad_norms = []
        for t in range(1, 21):
            x = torch.randn(16, 5, generator=g)
            opt.zero_grad()
            loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
            loss.backward()
            grad_norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
            opt.step()
            rec.step(loss=loss, optimizer=opt, accuracy=0.5)
            thetas.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    r = Run.open(run.path)
    assert r.status == "finished"
    wide = r.scalars(wide=True)
    assert wide.index.tolist() == list(range(21))
    assert set(wide.columns) == {"loss", "lr", "lr/1", "grad_norm", "update_norm", "param_norm", "accuracy"}
    assert wide.loc[7, "lr"] == pytest.approx(0.1) and wide.loc[7, "lr/1"] == pytest.approx(0.05)
    for t in (0, 1, 13, 20):  # norms against the obvious reference, float32 tolerance
        assert wide.loc[t, "param_norm"] == pytest.approx(thetas[t].norm().item(), rel=1e-5)
    for t in (1, 13, 20):
        assert wide.loc[t, "update_norm"] == pytest.approx((thetas[t] - thetas[t - 1]).norm().item(), rel=1e-4)
        assert wide.loc[t, "grad_norm"] == pytest.approx(grad_norms[t - 1], rel=1e-5)
    assert r.snapshot_steps("params") == [0, 1, 2, 3, 10, 20]
    assert set(r.load_snapshot(10)) == {"0.weight", "0.bias"}  # the name filter
    assert r.snapshot_steps("grads") == [5] and r.snapshot_steps("optim") == [5]
    assert "momentum_buffer" in r.load_state(5, "optim")["state"][0]
    assert r.snapshot_steps("checkpoint") == [12]
    steps, sk = r.sketches()
    assert steps.tolist() == list(range(21))
    # The stored sketch is the sketch of the parameter vector at that step.
    ref = Sketcher(k=64, seed=0)
    names = [n for n, _ in model.named_parameters()]
    final = dict(zip(names, [p.detach() for p in model.parameters()]))
    assert torch.allclose(sk[20], ref.sketch(list(final.items())), atol=1e-5)
    snap = r.load_snapshot(3)
    assert torch.equal(snap["0.weight"].flatten(), thetas[3][:40])


def test_nan_loss_marks_run_diverged_and_keeps_earlier_steps(root):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = Run.create(root, {"x": "nan"})
    rec = trajscope.Recorder(model, run, commit_every_s=10.0)
    with pytest.raises(DivergedError, match="diverged at step 6"):
        _loop(model, opt, rec, 10, lr_bomb_at=6)
    r = Run.open(run.path)
    assert r.status == "diverged" and r.meta["status_step"] == 6
    steps = sorted(set(r.scalars()["step"]))
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    assert r.load_snapshot(5)  # snapshots before the divergence read back
    rec.close()  # closing after divergence is harmless
    assert Run.open(run.path).status == "diverged"


def test_exception_in_loop_marks_crashed(root):
    model = _model()
    run = Run.create(root, {"x": "boom"})
    with pytest.raises(RuntimeError):
        with trajscope.Recorder(model, run):
            raise RuntimeError("user bug")
    assert Run.open(run.path).status == "crashed"


def test_checkpoint_capture_restore_continues_exactly(tmp_path):
    def train(model, opt, steps):
        out = []
        for _ in range(steps):
            x = torch.randn(8, 5)  # draws from the global RNG, which the checkpoint holds
            opt.zero_grad()
            loss = nn.functional.dropout(model(x), 0.3).pow(2).mean()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    torch.manual_seed(1)
    m = _model()
    o = torch.optim.Adam(m.parameters(), lr=1e-2)
    train(m, o, 5)
    state = capture(m, o, extra={"step": 5})
    run = Run.create(tmp_path, {"c": 1})
    run.save_state(5, state)
    expected = train(m, o, 5)

    m2 = _model()
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    torch.manual_seed(999)  # a different RNG state, which restore must overwrite
    assert restore(run.load_state(5), m2, o2) == {"step": 5}
    assert train(m2, o2, 5) == expected  # bitwise
    run.close("finished")


def test_flat_and_per_tensor_state_record_the_same_run(root):
    """The flat fast path (small models) against the per-tensor path (``flat_max=0``), and both
    against the obvious reference; one frozen tensor (no gradient) takes the partial-gradient path."""
    runs, thetas, grads = [], [], []
    for flat_max in (1 << 22, 0):
        model = _model()
        model[0].bias.requires_grad_(False)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        run = Run.create(root, {"flat_max": flat_max})
        th, gs = [torch.cat([p.detach().flatten().clone() for p in model.parameters()])], []
        with trajscope.Recorder(model, run, flat_max=flat_max, sketch_dim=128, commit_every_s=0) as rec:
            g = torch.Generator().manual_seed(0)
            for _ in range(5):
                x = torch.randn(16, 5, generator=g)
                opt.zero_grad()
                ((model(x) - x.sum(1, keepdim=True)) ** 2).mean().backward()
                gs.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm().item())
                opt.step()
                rec.step(loss=1.0, optimizer=opt)
                th.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        runs.append(Run.open(run.path))
        thetas.append(th)
        grads.append(gs)
    flat, per = runs
    for fm, kind in ((1 << 22, "FlatState"), (0, "TensorState")):
        probe = trajscope.Recorder(_model(), Run.create(root, {"probe": fm}), flat_max=fm)
        assert type(probe._state).__name__ == kind
        probe.close()
    a, b = flat.scalars(wide=True), per.scalars(wide=True)
    assert list(a.columns) == list(b.columns) and list(a.index) == list(range(6))
    for t in range(1, 6):
        assert a.loc[t, "param_norm"] == pytest.approx(thetas[0][t].norm().item(), rel=1e-5)
        assert a.loc[t, "update_norm"] == pytest.approx((thetas[0][t] - thetas[0][t - 1]).norm().item(), rel=1e-4)
        assert a.loc[t, "grad_norm"] == pytest.approx(grads[0][t - 1], rel=1e-5)
        for name in ("param_norm", "update_norm", "grad_norm"):
            assert a.loc[t, name] == pytest.approx(b.loc[t, name], rel=1e-5)
    (sa, ka), (sb, kb) = flat.sketches(), per.sketches()
    assert list(sa) == list(sb) == list(range(6))
    torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-6)
    ref = Sketcher(k=128, seed=0)
    names = [n for n, _ in _model().named_parameters()]
    sizes = [p.numel() for p in _model().parameters()]
    final = dict(zip(names, [v.reshape(s.shape) for v, s in zip(torch.split(thetas[0][5], sizes), _model().parameters())]))
    torch.testing.assert_close(ka[5], ref.sketch(list(final.items())), rtol=1e-5, atol=1e-6)
    # the flat path writes whole-model snapshots straight from its buffer: bitwise the same file
    # content as the general encoder, read back by safetensors' own loader
    assert flat.snapshot_steps() == per.snapshot_steps() == list(range(6))
    for t in (0, 3, 5):
        sa, sb = flat.load_snapshot(t), per.load_snapshot(t)
        assert list(sa) == list(sb) == names
        assert all(torch.equal(sa[n], sb[n]) for n in names)
        assert torch.equal(torch.cat([sa[n].flatten() for n in names]), thetas[0][t])


def test_non_finite_parameters_with_a_finite_loss_are_found_at_their_step(root):
    """A parameter that the loss does not use turns NaN at step 5: the loss stays finite, the
    batched state notices it at most 16 steps later, and the run ends diverged at step 5 with the
    later steps it had already taken dropped."""
    model = _model()
    model.unused = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = Run.create(root, {"x": "nan-param"})
    rec = trajscope.Recorder(model, run, commit_every_s=10.0)
    g = torch.Generator().manual_seed(0)
    raised_at = None
    with pytest.raises(DivergedError, match="diverged at step 5: parameters are not finite"):
        for t in range(1, 40):
            x = torch.randn(16, 5, generator=g)
            opt.zero_grad()
            loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
            loss.backward()
            opt.step()
            if t == 5:
                with torch.no_grad():
                    model.unused[1] = float("nan")
            raised_at = t
            rec.step(loss=loss, optimizer=opt)
    assert 5 <= raised_at <= 5 + 16
    r = Run.open(run.path)
    assert r.status == "diverged" and r.meta["status_step"] == 5
    assert sorted(set(r.scalars()["step"])) == [0, 1, 2, 3, 4, 5]
    assert max(r.snapshot_steps("params")) <= 5


def test_plan_gives_what_the_schedules_give_at_every_step():
    from trajscope.record.plan import Plan, is_pure

    pure = (S.every(1), S.until(100) | S.logspace(20), S.every(3, start=7), S.at([3, 700, 1500]) & ~S.every(2), S.never())
    plan = Plan(pure, window=64)
    assert plan.pure and all(is_pure(s) for s in pure)
    steps = list(range(0, 300)) + list(range(690, 710)) + [1499, 1500, 1501, 5]  # jumps back and forth
    for t in steps:
        assert plan(t) == tuple(bool(s(t)) for s in pure), t
    impure = Plan((S.every(2), lambda t: t % 3 == 0))
    assert not impure.pure and [impure(t) for t in range(6)] == [(t % 2 == 0, t % 3 == 0) for t in range(6)]


def test_plan_windows_in_closed_form_equal_the_schedules():
    """Plan decides each pure schedule class by its rule over a window (no call per step): equal to
    calling the schedule at every step, for every class, combinator and window position."""
    from trajscope.record.plan import _window

    cases = [S.never(), S.every(1), S.every(3), S.every(7, start=5), S.until(13), S.at([0, 2, 99, 1000, 4000]),
             S.logspace(1), S.logspace(3), S.logspace(20), S.logspace(100), S.dense_early(),
             S.every(4) | S.until(10), S.every(2) & S.logspace(10), ~S.every(3), ~(S.until(50) | S.logspace(7)),
             S.AllOf(()), S.AnyOf(())]
    for s in cases:
        for start in (0, 1, 5, 97, 100, 511, 999, 5000, 100_000):
            for n in (1, 7, 512):
                assert _window(s, start, n) == [bool(s(t)) for t in range(start, start + n)], (s, start, n)
