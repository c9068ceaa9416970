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
