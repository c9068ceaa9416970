"""Finite-difference Hessian-vector products (kinks frozen) against double backward and closed forms.

Tolerances: float64. A forward difference has error O(h) from the third derivative (h = 4.6e-10 *
|theta| / |v| by default) plus rounding eps / h ~ 5e-7 relative to the gradient, so products are
compared at rtol 1e-4 (of the largest entry); a central difference at 1e-6. On a quadratic both are
exact up to rounding.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trajscope.functional.fd_hvp import FreezePieces, default_step
from trajscope.functional.hessian import hessian_vector_product, top_hessian_eigenvalues
from trajscope.functional.hvp import CurvatureOperator, measurement_state
from test_hessian import Quadratic, float64, full_hessian, make, quad_loss, random_spd  # noqa: F401 (float64: autouse)


class Kinks(nn.Module):
    """Every piecewise-linear function that is frozen: relu (in place too), leaky_relu, hardtanh,
    relu6, max pooling; BatchNorm in front of them."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4)
        self.act = nn.ReLU(inplace=True)
        self.lin1, self.lin2 = nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):  # (B, 6)
        h = self.act(self.bn(self.conv(x.unsqueeze(1))))  # (B, 4, 6)
        h = F.max_pool1d(F.leaky_relu(h, 0.2), 2)  # (B, 4, 3)
        h = F.hardtanh(self.lin1(h.flatten(1)), -0.5, 0.5) + F.relu6(3 * h.flatten(1)[:, :8])
        return self.lin2(torch.relu(h) + 0.1 * h)


def _kinks(seed=0):
    torch.manual_seed(seed)
    return Kinks(), torch.randn(16, 6), torch.randint(0, 3, (16,))


def test_quadratic_difference_is_exact():
    n = 30
    A, _ = random_spd(n, seed=1)
    model, data = Quadratic(n), (torch.zeros(1), torch.zeros(1))
    v = torch.randn(n)
    for method in ("finite-difference", "central-difference"):
        hv = hessian_vector_product(model, quad_loss(A), data, v, method=method)
        assert torch.allclose(hv, A @ v, rtol=1e-6, atol=1e-6 * float((A @ v).abs().max())), method


@pytest.mark.parametrize("kind", ["mlp", "cnn", "attn", "kinks"])
@pytest.mark.parametrize("train", [True, False])
def test_difference_products_match_double_backward(kind, train):
    model, x, y = _kinks() if kind == "kinks" else make(kind)
    P = sum(p.numel() for p in model.parameters())
    for seed in range(3):
        v = torch.randn(P, generator=torch.Generator().manual_seed(seed))
        ref = hessian_vector_product(model, F.cross_entropy, (x, y), v, train=train)
        scale = float(ref.abs().max())
        for method, rtol in (("finite-difference", 1e-4), ("central-difference", 1e-6)):
            hv = hessian_vector_product(model, F.cross_entropy, (x, y), v, method=method, train=train)
            assert float((hv - ref).abs().max()) <= rtol * scale, (kind, method)


def test_without_frozen_pieces_relu_differences_are_wrong():
    """Why the pieces are frozen: a plain difference across ReLU kinks is far from H v."""
    model, x, y = _kinks()
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P, generator=torch.Generator().manual_seed(0))
    ref = hessian_vector_product(model, F.cross_entropy, (x, y), v)
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach() for p in model.parameters()]

    def grad(h):
        ps = [(t + h * c.view_as(t)).requires_grad_() for t, c in zip(theta, v.split([t.numel() for t in theta]))]
        out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(out, y), ps)])

    with measurement_state(model, True):
        h = 1e-2  # large enough to cross kinks
        plain = (grad(h) - grad(-h)) / (2 * h)
        op = CurvatureOperator(model, F.cross_entropy, (x, y), method="central-difference")
        fd = op._difference()
        fd.rel_step = h * float(v.norm()) / max(fd.theta_norm, 1.0)  # the same h as the plain one
        frozen = op(v)
    err = lambda hv: float((hv - ref).norm() / ref.norm())  # noqa: E731
    assert err(plain) > 10 * err(frozen)


def test_top_eigenvalue_by_differences_matches_eigvalsh():
    model, x, y = _kinks()
    ev = torch.linalg.eigvalsh(full_hessian(model, F.cross_entropy, x, y))[-1]
    for method in ("finite-difference", "central-difference", "auto"):
        eig = top_hessian_eigenvalues(model, F.cross_entropy, (x, y), tol=1e-7, max_iter=120, method=method,
                                      generator=torch.Generator().manual_seed(0))
        assert float(eig.values[0]) == pytest.approx(float(ev), rel=1e-5), method


def test_no_side_effect_and_dropout_masks_repeat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    before = copy.deepcopy(model.state_dict())
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    torch.manual_seed(5)
    ref = hessian_vector_product(model, F.cross_entropy, (x, y), v)  # one graph: one dropout mask
    torch.manual_seed(5)
    hv = hessian_vector_product(model, F.cross_entropy, (x, y), v, method="central-difference")
    assert torch.allclose(hv, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training


def test_auto_falls_back_on_unfrozen_kinks_and_explicit_method_refuses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Hardswish(), nn.Linear(6, 3))  # hardswish: not frozen
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    with measurement_state(model, True):
        op = CurvatureOperator(model, F.cross_entropy, (x, y), method="auto")
        hv = op(v)
        assert op.resolved == "double-backward"
    assert torch.equal(hv, hessian_vector_product(model, F.cross_entropy, (x, y), v))
    with pytest.raises(ValueError, match="hardswish"):
        hessian_vector_product(model, F.cross_entropy, (x, y), v, method="finite-difference")
    with pytest.raises(ValueError, match="one \\(x, y\\) batch"):
        hessian_vector_product(model, F.cross_entropy, [(x, y), (x, y)], v, method="finite-difference")
    # a loader with "auto": double backward
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    assert torch.allclose(hessian_vector_product(model, F.cross_entropy, loader, v, method="auto"),
                          hessian_vector_product(model, F.cross_entropy, loader, v))


def test_freeze_replays_pieces_in_call_order():
    z0 = torch.tensor([-1.0, 2.0, 0.5])
    rec = FreezePieces()
    with rec:
        a = F.relu(z0)
    assert torch.equal(a, F.relu(z0)) and len(rec.pieces) == 1
    with FreezePieces(rec.pieces):
        b = F.relu(torch.tensor([3.0, -4.0, 1.0]))  # the pieces of z0: off, on, on
    assert torch.equal(b, torch.tensor([0.0, -4.0, 1.0]))
    assert default_step("forward", torch.float32) == pytest.approx(torch.finfo(torch.float32).eps ** 0.5 / 32)


def _operator_products(model, x, y, vs, **kw):
    with measurement_state(model, True):
        op = CurvatureOperator(model, F.cross_entropy, (x, y), method="finite-difference", **kw)
        return [op(v) for v in vs], op._difference()


@pytest.mark.parametrize("kind", ["kinks", "sequential"])
def test_replay_inside_the_activation_modules_equals_the_whole_pass_replay(kind):
    """The mode runs only inside the modules that made the piecewise calls; same products, bit for bit."""
    if kind == "kinks":  # torch.relu in the root's forward: the whole forward is the scope
        model, x, y = _kinks()
    else:
        torch.manual_seed(0)
        act = nn.ReLU()  # one module called twice
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), act, nn.Linear(8, 8), act,
                              nn.MaxPool1d(2), nn.Linear(4, 3))
        x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    P = sum(p.numel() for p in model.parameters())
    vs = [torch.randn(P, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    scoped, fd = _operator_products(model, x, y, vs)
    assert fd._scope == ([model] if kind == "kinks" else [act, model[5]])
    whole = []
    with measurement_state(model, True):
        fd._scope = None  # the same operator, the mode around the whole pass
        whole = [fd(v) for v in vs]
    assert all(torch.equal(a, b) for a, b in zip(scoped, whole))
    assert not [m for m in model.modules() if "forward" in m.__dict__]  # their own forward is back


def test_inplace_products_restore_parameters_exactly_even_on_error():
    model, x, y = make("cnn")
    before = copy.deepcopy(model.state_dict())
    P = sum(p.numel() for p in model.parameters())
    calls = []

    def loss_fn(out, y_):
        calls.append(1)
        if len(calls) == 2:  # the first perturbed pass
            raise RuntimeError("boom")
        return F.cross_entropy(out, y_)
    with pytest.raises(RuntimeError, match="boom"):
        hessian_vector_product(model, loss_fn, (x, y), torch.randn(P), method="finite-difference")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_given_base_gradient_saves_the_backward_pass_and_a_wrong_one_is_not_used(monkeypatch):
    model, x, y = _kinks()
    P = sum(p.numel() for p in model.parameters())
    vs = [torch.randn(P, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ref, _ = _operator_products(model, x, y, vs)
    loss = F.cross_entropy(model(x), y)  # train mode: the step's loss and gradient
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    loss = float(loss.detach())
    n = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: n.append(1) or grad(*a, **k))
    reused, _ = _operator_products(model, x, y, vs, base=(loss, g))
    assert len(n) == len(vs)  # no backward pass for the base
    for a, b in zip(reused, ref):
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())
    n.clear()  # a gradient of another loss value: computed again, the same products as without it
    wrong, _ = _operator_products(model, x, y, vs, base=(loss * 1.01, torch.zeros(P)))
    assert len(n) == len(vs) + 1
    for a, b in zip(wrong, ref):
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())
