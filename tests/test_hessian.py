"""Curvature routines against slow, obvious references: closed forms on quadratics, and the full
Hessian built by autograd (torch.autograd.functional.hessian over a flat parameter vector) and
decomposed with eigvalsh on tiny models (MLP, CNN with BatchNorm, attention with LayerNorm).

Tolerances: float64 throughout, so products agree to ~1e-10; Lanczos to its stated tolerance
(relative residual, which bounds the eigenvalue error); Hutchinson within 4 standard errors
(a fixed seed makes it deterministic; 4 sigma fails with probability < 1e-4 for a fresh seed).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from trajscope.events import StepContext
from trajscope.functional.hessian import (adam_preconditioner, hessian_spectral_density, hessian_trace,
                                          hessian_vector_product, preconditioned_sharpness, stability_threshold,
                                          top_hessian_eigenvalues)
from trajscope.functional.hvp import flatten, unflatten
from trajscope.functional.lanczos import gaussian_density, hutchinson_trace, lanczos_quadrature, top_eigenvalues
from trajscope.probes.sharpness import SharpnessProbe
from trajscope import workloads

METHODS = ["double-backward", "forward-over-reverse"]


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Quadratic(nn.Module):
    """Output theta itself; with ``quad_loss`` the loss is 0.5 theta^T A theta, so H = A."""

    def __init__(self, n):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return self.theta


def quad_loss(A):
    return lambda out, y: 0.5 * out @ A @ out


def random_spd(n, seed=0, neg=False):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    ev = torch.linspace(-1.0 if neg else 0.1, 5.0, n) ** 3
    return (Q * ev) @ Q.T, ev.sort().values


class Attn(nn.Module):
    """Linear embedding, LayerNorm, 2-head causal SDPA with q/k/v/o projections, mean-pooled head."""

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.embed, self.norm = nn.Linear(3, d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x (B, T, 3)
        h = self.norm(self.embed(x))
        B, T, D = h.shape
        q, k, v = (p(h).view(B, T, 2, D // 2).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        return self.head((h + self.o(a)).mean(1))


def make(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        model, x = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(8, 5)
    elif kind == "cnn":
        model = nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 3, 3, padding=1), nn.BatchNorm1d(3),
                              nn.ReLU(), nn.Flatten(), nn.Linear(18, 3))
        model[2].running_mean.uniform_(-0.5, 0.5)  # eval mode must differ from train mode
        model[2].running_var.uniform_(0.5, 2.0)
        x = torch.randn(8, 6)
    else:
        model, x = Attn(), torch.randn(8, 4, 3)
    return model, x, torch.randint(0, 3, (8,))


def full_hessian(model, loss_fn, x, y, train=True):
    """The reference: autograd Hessian of the loss as a function of the flat parameter vector."""
    m = copy.deepcopy(model).train(train)
    names, params = zip(*[(n, p.detach()) for n, p in m.named_parameters() if p.requires_grad])

    def f(theta):
        return loss_fn(functional_call(m, dict(zip(names, unflatten(theta, params))), (x,)), y)

    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.hessian(f, flatten(params))


# ---- quadratics: closed forms -----------------------------------------------------------------------


def test_quadratic_eigenvalues_trace_and_density():
    n = 40
    A, ev = random_spd(n, neg=True)
    model, data = Quadratic(n), (torch.zeros(1), torch.zeros(1))
    eig = top_hessian_eigenvalues(model, quad_loss(A), data, k=3, tol=1e-10, max_iter=n)
    assert torch.allclose(eig.values, ev.flip(0)[:3], rtol=1e-8) and eig.converged
    for lam, u in zip(eig.values, eig.vectors):
        assert (A @ u - lam * u).norm() < 1e-6 * abs(lam)
    # warm start from the top eigenvector: converged after one or two products
    warm = top_hessian_eigenvalues(model, quad_loss(A), data, tol=1e-8, v0=eig.vectors[0])
    assert warm.n_iter <= 2 and abs(warm.values[0] - ev[-1]) < 1e-8 * ev[-1]
    # Hutchinson: within 4 standard errors; deflating the whole space makes it exact
    g = torch.Generator().manual_seed(0)
    est = hessian_trace(model, quad_loss(A), data, rtol=0.02, generator=g)
    assert abs(est.mean - A.trace()) <= 4 * est.stderr and est.stderr < 0.02 * abs(est.mean)
    exact = hessian_trace(model, quad_loss(A), data, deflate=n, min_samples=3, generator=g)
    assert abs(exact.mean - A.trace()) < 1e-8 * abs(A.trace()) and exact.stderr < 1e-8
    # SLQ with n steps: the nodes are the eigenvalues; moments average to tr(A^k) / n
    dens = hessian_spectral_density(model, quad_loss(A), data, n_probes=200, steps=n, generator=g)
    assert torch.allclose(dens.nodes[0].sort().values, ev, atol=1e-6 * ev.abs().max())
    for k in (1, 2):
        moment = (dens.weights * dens.nodes ** k).sum(1)  # per probe, unbiased for tr(A^k) / n
        ref = torch.linalg.matrix_power(A, k).trace() / n
        assert abs(moment.mean() - ref) <= 4 * moment.std() / math.sqrt(len(moment))


def test_diagonal_hutchinson_is_exact_and_quadrature_is_gauss():
    d = torch.linspace(-1, 3, 25)
    est = hutchinson_trace(lambda v: d * v, 25, min_samples=5, dtype=torch.float64)
    assert est.n == 5 and est.stderr == 0 and abs(est.mean - d.sum()) < 1e-12  # z_i^2 = 1
    A, _ = random_spd(30, seed=1)
    v = torch.randn(30)
    nodes, weights = lanczos_quadrature(lambda u: A @ u, v, steps=5)
    assert abs(weights.sum() - 1) < 1e-12
    for k in range(10):  # m-point Gauss quadrature is exact up to degree 2m - 1 = 9
        ref = v @ torch.linalg.matrix_power(A, k) @ v / (v @ v)
        assert torch.isclose((weights * nodes ** k).sum(), ref, rtol=1e-7)


def test_gaussian_density_integrates_to_one_and_matches_formula():
    nodes, weights = torch.tensor([[0.0, 2.0], [1.0, 1.0]]), torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    grid = torch.linspace(-5, 7, 4001)
    dens = gaussian_density(nodes, weights, grid, sigma=0.3)
    assert abs(torch.trapezoid(dens, grid) - 1) < 1e-6
    t = torch.tensor(2.0)
    ref = sum(w * torch.exp(-0.5 * ((t - c) / 0.3) ** 2) / (0.3 * math.sqrt(2 * math.pi))
              for row_n, row_w in zip(nodes, weights) for c, w in zip(row_n, row_w)) / 2
    assert torch.isclose(gaussian_density(nodes, weights, t[None], 0.3)[0], ref)


# ---- tiny networks against the full autograd Hessian ----------------------------------------------------


@pytest.mark.parametrize("kind,train", [("mlp", True), ("cnn", True), ("cnn", False), ("attn", True)])
def test_hvp_methods_agree_with_full_hessian(kind, train):
    model, x, y = make(kind)
    H = full_hessian(model, F.cross_entropy, x, y, train)
    v = torch.randn(len(H))
    for method in METHODS:
        hv = hessian_vector_product(model, F.cross_entropy, (x, y), v, method=method, train=train)
        assert torch.allclose(hv, H @ v, rtol=1e-8, atol=1e-10), method
    as_list = hessian_vector_product(model, F.cross_entropy, (x, y), unflatten(v, list(model.parameters())),
                                     train=train)
    assert torch.allclose(flatten(as_list), H @ v, rtol=1e-8, atol=1e-10)


def test_unused_parameters_get_zero_curvature():
    class WithUnused(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.unused = net, nn.Linear(2, 2)  # registered, never called in forward

        def forward(self, x):
            return self.net(x)

    net, x, y = make("mlp")
    model = WithUnused(net)
    H = full_hessian(model, F.cross_entropy, x, y)
    v = torch.randn(len(H))
    for method in METHODS:
        for curvature in ("hessian", "gauss-newton"):
            out = hessian_vector_product(model, F.cross_entropy, (x, y), v, method=method, curvature=curvature)
            assert torch.all(out[-6:] == 0), (method, curvature)
        hv = hessian_vector_product(model, F.cross_entropy, (x, y), v, method=method)
        assert torch.allclose(hv, H @ v, rtol=1e-8, atol=1e-10)


def test_loader_averages_over_the_whole_set():
    model, x, y = make("mlp")
    x, y = torch.cat([x, torch.randn(5, 5)]), torch.cat([y, torch.tensor([0, 1, 2, 0, 1])])
    loader = [(x[:3], y[:3]), (x[3:8], y[3:8]), (x[8:], y[8:])]  # sizes 3, 5, 5
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    ref = full_hessian(model, F.cross_entropy, x, y) @ v  # no BatchNorm: same as the whole set at once
    for method in METHODS:
        assert torch.allclose(hessian_vector_product(model, F.cross_entropy, loader, v, method=method), ref)
    with pytest.raises(TypeError):
        hessian_vector_product(model, F.cross_entropy, iter(loader), v)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "attn"])
def test_gauss_newton_matches_explicit_jt_h_j(kind):
    model, x, y = make(kind)
    m = copy.deepcopy(model).train()
    names, params = zip(*[(n, p.detach()) for n, p in m.named_parameters()])

    def out_of(theta):
        return functional_call(m, dict(zip(names, unflatten(theta, params))), (x,)).reshape(-1)

    with sdpa_kernel([SDPBackend.MATH]):
        J = torch.autograd.functional.jacobian(out_of, flatten(params))  # (B*C, P)
        out = out_of(flatten(params)).detach()
    HL = torch.autograd.functional.hessian(lambda z: F.cross_entropy(z.view(len(x), -1), y), out)
    G, v = J.T @ HL @ J, torch.randn(J.shape[1])
    for method in METHODS:
        gv = hessian_vector_product(model, F.cross_entropy, (x, y), v, method=method, curvature="gauss-newton")
        assert torch.allclose(gv, G @ v, rtol=1e-8, atol=1e-10), method
    eig = top_hessian_eigenvalues(model, F.cross_entropy, (x, y), tol=1e-8, curvature="gauss-newton")
    assert torch.isclose(eig.values[0], torch.linalg.eigvalsh(G)[-1], rtol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "attn"])
def test_lanczos_and_hutchinson_match_eigvalsh(kind):
    model, x, y = make(kind)
    H = full_hessian(model, F.cross_entropy, x, y)
    ev = torch.linalg.eigvalsh(H).flip(0)
    eig = top_hessian_eigenvalues(model, F.cross_entropy, (x, y), k=3, tol=1e-3, max_iter=len(H))
    assert eig.converged and (eig.residuals <= 1e-3).all()
    assert ((eig.values - ev[:3]).abs() <= 1e-3 * eig.values.abs()).all()  # the stated bound
    g = torch.Generator().manual_seed(1)
    for deflate in (0, 10):
        est = hessian_trace(model, F.cross_entropy, (x, y), rtol=0.05, max_samples=300, deflate=deflate,
                            generator=g)
        assert abs(est.mean - H.trace()) <= 4 * est.stderr, deflate


def test_measurement_leaves_batchnorm_state_and_modes_unchanged():
    model, x, y = make("cnn")
    model.train()
    model[5].eval()  # a mixed state must come back exactly as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    for method in METHODS:
        for train in (True, False):
            hessian_vector_product(model, F.cross_entropy, (x, y), v, method=method, train=train)
            top_hessian_eigenvalues(model, F.cross_entropy, (x, y), tol=1e-2, method=method, train=train)
    hessian_trace(model, F.cross_entropy, (x, y), rtol=0.2, max_samples=20)
    hessian_spectral_density(model, F.cross_entropy, (x, y), n_probes=1, steps=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    h_train = hessian_vector_product(model, F.cross_entropy, (x, y), v, train=True)
    h_eval = hessian_vector_product(model, F.cross_entropy, (x, y), v, train=False)
    assert not torch.allclose(h_train, h_eval)  # the two modes are different functions


# ---- optimizers --------------------------------------------------------------------------------------


def _diverges(make_opt, lam, steps=600):
    """Run the real torch optimizer on lam * x^2 / 2 from x = 1; True if |x| grew."""
    x = nn.Parameter(torch.ones(1))
    opt = make_opt([x])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * x ** 2).sum().backward()
        opt.step()
    return abs(float(x.detach())) > 1.0


@pytest.mark.parametrize("kw,closed", [
    (dict(momentum=0.0), 2 / 0.1),
    (dict(momentum=0.9), 3.8 / 0.1),
    (dict(momentum=0.5, dampening=0.5), 3.0 / 0.05),
    (dict(momentum=0.9, nesterov=True), 3.8 / (0.1 * 2.8)),
])
def test_sgd_stability_threshold_closed_form_and_dynamics(kw, closed):
    make_opt = lambda p: torch.optim.SGD(p, lr=0.1, **kw)  # noqa: E731
    thr = stability_threshold(make_opt([nn.Parameter(torch.ones(1))]))
    assert thr == pytest.approx(closed)
    assert not _diverges(make_opt, 0.97 * thr) and _diverges(make_opt, 1.03 * thr)


def test_adam_stability_threshold_and_preconditioner():
    opt = torch.optim.Adam([nn.Parameter(torch.ones(1))], lr=0.01, betas=(0.9, 0.999))
    assert stability_threshold(opt) == pytest.approx(38 / 0.01)
    opt2 = torch.optim.AdamW([nn.Parameter(torch.ones(1))], lr=0.1, betas=(0.8, 0.99))
    assert stability_threshold(opt2) == pytest.approx(3.6 / (0.1 * 0.2))
    with pytest.raises(ValueError):
        stability_threshold(torch.optim.SGD([{"params": [nn.Parameter(torch.ones(1))], "lr": 0.1},
                                             {"params": [nn.Parameter(torch.ones(1))], "lr": 0.2}]))
    # the preconditioner is exactly the denominator of torch's Adam update
    model, x, y = make("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = flatten([p.detach().clone() for p in model.parameters()])
        opt.step()
    params = list(model.parameters())
    m_hat = flatten([opt.state[p]["exp_avg"] for p in params]) / (1 - 0.9 ** 3)
    step = flatten([p.detach() for p in params]) - before
    assert torch.allclose(step, -0.01 * m_hat / adam_preconditioner(opt, params), rtol=1e-9)


def test_preconditioned_sharpness_matches_explicit_matrix():
    model, x, y = make("cnn")
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, eps=1e-4)
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    H = full_hessian(model, F.cross_entropy, x, y)
    s = adam_preconditioner(opt, list(model.parameters())).rsqrt()
    ref = torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1]
    eig = preconditioned_sharpness(model, F.cross_entropy, (x, y), opt, tol=1e-8, max_iter=200)
    assert torch.isclose(eig.values[0], ref, rtol=1e-6)


# ---- the probe -----------------------------------------------------------------------------------------


def test_sharpness_probe_values_warm_start_and_state():
    model, x, y = make("cnn")
    wl = workloads.get("mnist1d-mlp")  # only for its loss: cross-entropy
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctx = StepContext(config=None, run=None, model=model, optimizer=opt, workload=wl, batch=(x, y), step=1)
    probe = SharpnessProbe(tol=1e-6, max_iter=75)  # defaults: finite differences, value_tol = tol
    out = probe(ctx)
    ref = torch.linalg.eigvalsh(full_hessian(model, F.cross_entropy, x, y))[-1]
    assert out["lambda_max"] == pytest.approx(float(ref), rel=1e-6)
    exact = SharpnessProbe(tol=1e-6, max_iter=75, method="double-backward", value_tol=0.0)(ctx)
    assert exact["lambda_max"] == pytest.approx(float(ref), rel=1e-6) and exact["residual"] <= 1e-6
    assert out["stability_threshold"] == pytest.approx(38.0)
    assert out["stability_ratio"] == pytest.approx(out["lambda_max"] / 38.0)
    clone = SharpnessProbe(tol=1e-6, max_iter=75)
    clone.load_state_dict(probe.state_dict())
    assert torch.equal(clone.state_dict()["vectors"]["hessian"], probe.state_dict()["vectors"]["hessian"])
    assert clone(ctx)["lambda_max"] == pytest.approx(out["lambda_max"], rel=1e-6)
    # Adam: the preconditioned sharpness is the compared quantity
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    F.cross_entropy(model(x), y).backward()
    adam.step()
    ctx.optimizer = adam
    out = SharpnessProbe(every=16)(ctx)
    assert out["stability_ratio"] == pytest.approx(out["preconditioned_lambda_max"] / 38_000)


# ---- cheaper paths: subset start vector, eigenvalue-error stopping, warm-call budget --------------------


def test_subset_start_gives_the_same_top_eigenvalues_as_eigvalsh():
    """The subset only chooses the start vector: the answer is the full batch's, to the stated tol."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(600, 5), torch.randint(0, 3, (600,))
    ev = torch.linalg.eigvalsh(full_hessian(model, F.cross_entropy, x, y)).flip(0)
    for start in ("auto", 64, None):  # "auto": a 600-example batch qualifies (>= 512)
        eig = top_hessian_eigenvalues(model, F.cross_entropy, (x, y), k=2, tol=1e-6, max_iter=63,
                                      subset_start=start, generator=torch.Generator().manual_seed(0))
        assert eig.converged and torch.allclose(eig.values, ev[:2], rtol=1e-5), start
    # the start vector is nearly the subset's top direction, so the full run needs fewer products
    cold = top_hessian_eigenvalues(model, F.cross_entropy, (x, y), tol=1e-6, max_iter=63, subset_start=None,
                                   generator=torch.Generator().manual_seed(0))
    warm = top_hessian_eigenvalues(model, F.cross_entropy, (x, y), tol=1e-6, max_iter=63, subset_start=300,
                                   generator=torch.Generator().manual_seed(0))
    assert warm.n_iter < cold.n_iter and abs(float(warm.values[0] - ev[0])) <= 1e-6 * float(ev[0])
    with pytest.raises(ValueError, match="subset_start"):
        top_hessian_eigenvalues(model, F.cross_entropy, (x, y), subset_start=0)


def test_value_tol_stops_at_the_estimated_eigenvalue_error():
    n = 60
    A, ev = random_spd(n, seed=3)
    model, data = Quadratic(n), (torch.zeros(1), torch.zeros(1))
    g = torch.Generator().manual_seed(0)
    full = top_hessian_eigenvalues(model, quad_loss(A), data, tol=1e-10, max_iter=n, generator=g)
    g = torch.Generator().manual_seed(0)
    early = top_hessian_eigenvalues(model, quad_loss(A), data, tol=1e-10, max_iter=n, value_tol=1e-4,
                                    generator=g)
    assert early.n_iter < full.n_iter
    assert abs(float(early.values[0]) - float(ev[-1])) <= 1e-4 * float(ev[-1])  # the estimate held
    # the estimate itself: rho^2 / (gap theta), against a 2 x 2 case done by hand
    from trajscope.functional.lanczos import value_error
    est = value_error(torch.tensor([1.0, 3.0]), torch.tensor([0.1]), 1)
    assert float(est[0]) == pytest.approx(0.01 / (2.0 * 3.0))


def test_sharpness_probe_warm_iter_caps_warm_calls():
    model, x, y = make("cnn")
    wl = workloads.get("mnist1d-mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(config=None, run=None, model=model, optimizer=opt, workload=wl, batch=(x, y), step=1)
    probe = SharpnessProbe(tol=1e-9, max_iter=40, warm_iter=2, method="double-backward", value_tol=0.0)
    first = probe(ctx)
    assert first["iterations"] > 2
    assert probe(ctx)["iterations"] == 1  # same parameters: the warm vector has converged already
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # new parameters: the cap applies
    second = probe(ctx)
    assert second["iterations"] == 2
    ref = float(torch.linalg.eigvalsh(full_hessian(model, F.cross_entropy, x, y))[-1])
    assert second["lambda_max"] <= ref * (1 + 1e-9)  # a Ritz value: never above lambda_max
    assert second["lambda_max"] == pytest.approx(ref, rel=0.05)  # one step later: still close
    with pytest.raises(ValueError, match="warm_iter"):
        SharpnessProbe(warm_iter=1)
