"""Gradient noise (functional/noise.py): each quantity against a brute-force reference on a tiny model."""

import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from trajscope.functional.noise import (batch_gradient, gradient_moments, gradient_snr, gradient_top_overlap,
                                        noise_scale, per_sample_grads, top_subspace_overlap)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _cnn(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv1d(1, 3, 3, padding=1), nn.BatchNorm1d(3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3))
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.double()


def _data(n, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _loop_grads(model, x, y):
    """(B, P) per-example gradients by one backward per example, in eval mode."""
    model.eval()
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


@pytest.mark.parametrize("make,shape", [(_mlp, (5,)), (_cnn, (1, 8))])
def test_per_sample_grads_match_a_loop(make, shape):
    model = make()
    x, y = _data(11, shape)
    got = per_sample_grads(model, F.cross_entropy, x, y, chunk_size=4)
    flat = torch.cat([g.reshape(len(x), -1) for g in got.values()], 1)
    assert all(m.training for m in model.modules())  # the model's mode is restored
    torch.testing.assert_close(flat, _loop_grads(model, x, y), rtol=1e-10, atol=1e-12)


def test_noise_scale_against_its_definition():
    model = _mlp()
    x, y = _data(16, (5,))
    G = _loop_grads(model, x, y)  # (B, P)
    B = len(G)
    cov = torch.cov(G.T)  # (P, P), unbiased (divides by B - 1)
    trace = float(torch.trace(cov))
    g_bar = G.mean(0)
    g2 = float(g_bar @ g_bar) - trace / B
    # the unbiased |G|^2 estimate is the mean of <g_i, g_j> over pairs i != j
    gram = G @ G.T
    pairs = float(gram.sum() - gram.diagonal().sum()) / (B * (B - 1))
    assert g2 == pytest.approx(pairs, rel=1e-9)
    ns = noise_scale(gradient_moments(model, F.cross_entropy, x, y, chunk_size=5))
    assert ns.trace_cov == pytest.approx(trace, rel=1e-9)
    assert ns.grad_sq_norm == pytest.approx(g2, rel=1e-9)
    assert ns.b_simple == pytest.approx(trace / g2, rel=1e-9)
    assert ns.b_simple_biased == pytest.approx(trace / float(g_bar @ g_bar), rel=1e-9)


def test_gradient_snr_per_parameter_and_per_group():
    model = _mlp()
    x, y = _data(20, (5,))
    G = _loop_grads(model, x, y)
    mom = gradient_moments(model, F.cross_entropy, x, y, chunk_size=7)
    mean, var = G.mean(0), G.var(0, unbiased=True)
    snr = gradient_snr(mom)
    assert snr["all"] == pytest.approx(float((mean ** 2 / var).mean()), rel=1e-9)
    sizes = [p.numel() for p in model.parameters()]
    first = slice(0, sizes[0])  # "0.weight"
    assert snr["0.weight"] == pytest.approx(float((mean[first] ** 2 / var[first]).mean()), rel=1e-9)
    grp = gradient_snr(mom, {"first": ["0.weight", "0.bias"]}, kind="group")
    k = sizes[0] + sizes[1]
    assert grp["first"] == pytest.approx(float(mean[:k].pow(2).sum() / var[:k].sum()), rel=1e-9)


def test_top_subspace_overlap_with_explicit_hessian():
    model = _mlp()
    x, y = _data(30, (5,))
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(v):
        chunks, off = {}, 0
        for (n, p) in model.named_parameters():
            chunks[n] = v[off:off + p.numel()].view_as(p)
            off += p.numel()
        return F.cross_entropy(torch.func.functional_call(model, chunks, (x,)), y)

    H = torch.autograd.functional.hessian(loss_of, flat)
    lam, V = torch.linalg.eigh(H)
    top = V[:, -3:].T  # (3, P)
    g = batch_gradient(model, F.cross_entropy, (x, y))
    torch.testing.assert_close(g, torch.func.grad(loss_of)(flat))
    want = float((top @ g).pow(2).sum() / (g @ g))
    assert top_subspace_overlap(g, top) == pytest.approx(want, rel=1e-9)
    mixed = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0], [0.0, 0.0, 1.0]], dtype=torch.float64) @ top
    assert top_subspace_overlap(g, mixed) == pytest.approx(want, rel=1e-9)  # any basis of the span
    assert 0.0 <= want <= 1.0
    got, eig = gradient_top_overlap(model, F.cross_entropy, (x, y), 3, tol=1e-8, max_iter=80,
                                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(eig.values, lam[-3:].flip(0), rtol=1e-6, atol=1e-9)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert math.isnan(top_subspace_overlap(torch.zeros_like(g), top))
