"""The exponential learning-rate equivalence (trajscope.functional.explr) against a numeric root and
against two optimizers run side by side on a tiny, exactly scale-invariant model (float64)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trajscope.config import RunConfig
from trajscope.functional.explr import (exp_lr_alpha, exp_lr_at, exp_lr_schedule, first_step_mismatch,
                                        norm_ratio)
from trajscope.train.optim import schedule_factor


@pytest.mark.parametrize("lr,gamma,lam", [(0.1, 0.9, 5e-4), (0.5, 0.0, 1e-2), (0.05, 0.99, 1e-4), (1.0, 0.5, 0.05)])
def test_alpha_is_the_larger_root(lr, gamma, lam):
    roots = np.roots([1.0, -(1 + gamma - lam * lr), gamma])
    assert np.all(np.isreal(roots))
    assert exp_lr_alpha(lr, gamma, lam) == pytest.approx(float(np.max(roots.real)), rel=1e-12)
    if gamma == 0:
        assert exp_lr_alpha(lr, gamma, lam) == pytest.approx(1 - lam * lr, rel=1e-14)


def test_complex_roots_are_an_error():
    with pytest.raises(ValueError, match="no real root"):
        exp_lr_alpha(1.0, 0.9, 1.0)


def test_schedule_factor_convention_matches_the_formula():
    base, growth = exp_lr_schedule(0.1, 0.9, 5e-4)
    cfg = RunConfig(workload="mnist1d-cnn", lr=base, schedule="exp", exp_growth=growth, steps=100)
    for t in (1, 2, 7, 100):  # the trainer's t-th update (1-based) is the formula's t - 1 (0-based)
        assert cfg.lr * schedule_factor(cfg, t) == pytest.approx(exp_lr_at(0.1, 0.9, 5e-4, t - 1), rel=1e-12)


def _loss(w, x, y):
    """Cross-entropy of logits x @ (w / |w|)^T * 3: exactly invariant to the scale of w."""
    return F.cross_entropy(x @ (w / w.norm()).T * 3.0, y)


def _run(w0, x, y, steps, lr_of, wd, gamma, buffer=None):
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=lr_of(0), momentum=gamma, weight_decay=wd)
    if buffer is not None:
        opt.state[w]["momentum_buffer"] = buffer.clone()
    out = [w.detach().clone()]
    for t in range(steps):
        opt.param_groups[0]["lr"] = lr_of(t)
        opt.zero_grad()
        _loss(w, x, y).backward()
        opt.step()
        out.append(w.detach().clone())
    return out


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    w0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    return w0, x, y


def test_equivalence_without_momentum_is_exact(problem):
    w0, x, y = problem
    eta, lam = 0.5, 0.02
    wd = _run(w0, x, y, 30, lambda t: eta, lam, 0.0)
    ex = _run(w0, x, y, 30, lambda t: exp_lr_at(eta, 0.0, lam, t), 0.0, 0.0)
    for t in range(31):  # theta_exp_t = alpha^-t theta_wd_t
        torch.testing.assert_close(ex[t], wd[t] * norm_ratio(eta, 0.0, lam, t), rtol=1e-10, atol=1e-12)


def test_equivalence_with_momentum_after_the_first_step(problem):
    """With the exp run's momentum buffer seeded so that its first update is the shrink by alpha the
    derivation needs, the two runs agree exactly; seeded with nothing (as PyTorch and the trainer
    start) they differ after step 1 by exactly the radial mismatch of first_step_mismatch."""
    w0, x, y = problem
    eta, gamma, lam = 0.2, 0.9, 0.01
    alpha = exp_lr_alpha(eta, gamma, lam)
    wd = _run(w0, x, y, 25, lambda t: eta, lam, gamma)
    seed = (alpha - 1 + eta * lam) * w0 / (eta * gamma)  # gamma b0 eta/alpha = (1 - (1 - eta lam)/alpha) w0
    ex = _run(w0, x, y, 25, lambda t: exp_lr_at(eta, gamma, lam, t), 0.0, gamma, buffer=seed)
    for t in range(26):
        torch.testing.assert_close(ex[t], wd[t] * alpha ** (-t), rtol=1e-9, atol=1e-12)
    plain = _run(w0, x, y, 1, lambda t: exp_lr_at(eta, gamma, lam, t), 0.0, gamma)
    gap = (plain[1] * alpha - wd[1]).norm() / w0.norm()
    assert float(gap) == pytest.approx(alpha * abs(first_step_mismatch(eta, gamma, lam)), rel=1e-9)
    assert first_step_mismatch(eta, 0.0, lam) == pytest.approx(0.0, abs=1e-15)
    # the mismatch is about eta lam gamma / (1 - gamma) for small eta lam
    assert first_step_mismatch(0.1, 0.9, 5e-4) == pytest.approx(0.1 * 5e-4 * 0.9 / 0.1, rel=0.01)
    assert math.isfinite(first_step_mismatch(eta, gamma, lam))


def test_scale_invariant_names_finds_the_weights_before_batchnorm():
    """Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear: the two bias-free weights before a BN
    are invariant alone, the first BN's scale and shift together (ReLU and the next linear map are
    positively homogeneous and the second BN normalizes); the second BN's affine and the read-out,
    followed by no normalization, are not, even though the BN shifts are zero at init."""
    from torch import nn

    from trajscope.functional.explr import scale_invariant_names

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8, bias=False),
                          nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    found = scale_invariant_names(model, F.cross_entropy, (x, y))
    assert found == ["0.weight", "1.weight", "1.bias", "3.weight"]
    assert float(model[1].bias.detach().abs().sum()) == 0.0  # the original model is untouched
