"""The exponential learning-rate schedule equivalent to weight decay (Li and Arora, ICLR 2020).

For a loss that is scale-invariant in the parameters (L(c theta) = L(theta) for c > 0, e.g. a
weight followed by BatchNorm), SGD with heavy-ball momentum gamma, weight decay lambda and a fixed
learning rate eta, in PyTorch's form

    v_{t+1} = gamma v_t + grad L(theta_t) + lambda theta_t,   theta_{t+1} = theta_t - eta v_{t+1},

gives the same function at every step as SGD with momentum gamma, *no* weight decay and the
growing rate eta_t = eta alpha^(-2t-1) (t = 0 for the first update), where alpha is the larger root
of x^2 - (1 + gamma - lambda eta) x + gamma = 0; the two parameter vectors are related by
theta_exp_t = alpha^(-t) theta_wd_t, so the weight norm of the exponential run grows by alpha^(-1)
per step relative to the weight-decay run. Derivation (second-order form of the recursion): with
theta_t = alpha^t u_t and grad L(alpha^t u) = alpha^(-t) grad L(u), the weight-decay recursion
becomes u_{t+1} - u_t = (gamma / alpha^2)(u_t - u_{t-1}) - eta alpha^(-2t-1) grad L(u_t), which is
the momentum recursion of the exponential schedule (its momentum term carries the rate ratio
eta_t / eta_{t-1} = alpha^(-2)).

The first update differs: PyTorch starts both runs with an empty momentum buffer, so the
weight-decay run's first step shrinks theta_0 by (1 - lambda eta) while the equivalence needs a
shrink by alpha. Without momentum alpha = 1 - lambda eta and the equivalence is exact from step 0;
with momentum the runs differ by a radial component of relative size (1 - lambda eta) / alpha - 1
(about lambda eta gamma / (1 - gamma), 4.5e-4 for eta 0.1, lambda 5e-4, gamma 0.9) along theta_0
after step 1, which :func:`first_step_mismatch` returns.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import Tensor, nn


def exp_lr_alpha(lr: float, momentum: float, weight_decay: float) -> float:
    """alpha: the larger root of x^2 - (1 + momentum - weight_decay lr) x + momentum = 0.

    Real and in (0, 1] when weight_decay lr <= (1 - sqrt(momentum))^2 (always for the small
    products used in practice); outside that range the roots are complex and a ValueError says so.
    Without momentum alpha = 1 - weight_decay lr.
    """
    b = 1.0 + momentum - weight_decay * lr
    disc = b * b - 4.0 * momentum
    if disc < 0:
        raise ValueError(f"no real root for lr={lr}, momentum={momentum}, weight_decay={weight_decay}: "
                         f"weight_decay * lr must be at most (1 - sqrt(momentum))^2")
    # the larger root, written to avoid cancellation: (b + sqrt(disc)) / 2
    return 0.5 * (b + math.sqrt(disc))


def exp_lr_schedule(lr: float, momentum: float, weight_decay: float) -> tuple[float, float]:
    """(base_lr, growth) with which ``base_lr * growth ** (t - 1)`` is the rate of the t-th update
    (t >= 1, the convention of ``trajscope.train.optim.schedule_factor`` for ``schedule="exp"``)
    equal to eta alpha^(-2(t-1)-1): ``base_lr = lr / alpha``, ``growth = alpha ** -2``."""
    alpha = exp_lr_alpha(lr, momentum, weight_decay)
    return lr / alpha, alpha ** -2


def exp_lr_at(lr: float, momentum: float, weight_decay: float, t: int) -> float:
    """eta alpha^(-2t-1): the equivalent rate of update t (t = 0 for the first update)."""
    alpha = exp_lr_alpha(lr, momentum, weight_decay)
    return lr * alpha ** (-2 * t - 1)


def norm_ratio(lr: float, momentum: float, weight_decay: float, t: int) -> float:
    """alpha^(-t): the predicted |theta_exp_t| / |theta_wd_t| after t updates."""
    return exp_lr_alpha(lr, momentum, weight_decay) ** (-t)


def first_step_mismatch(lr: float, momentum: float, weight_decay: float) -> float:
    """(1 - weight_decay lr) / alpha - 1: the relative radial difference after the first update
    between the two runs started with empty momentum buffers (0 without momentum)."""
    return (1.0 - weight_decay * lr) / exp_lr_alpha(lr, momentum, weight_decay) - 1.0


def scale_invariant_names(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                          batch: tuple[Tensor, Tensor], factor: float = 3.0, rtol: float = 1e-4,
                          seed: int = 0) -> list[str]:
    """The parameters in a scale-invariant set: a tensor alone, or all the direct parameters of one
    module together (e.g. a BatchNorm's scale and shift when a convolution and another BatchNorm
    follow), such that the training-mode loss on ``batch`` is unchanged (within relative ``rtol``)
    when that set alone is multiplied by ``factor``.

    Checked on a copy of the model whose parameters are first moved off their init by seeded
    noise (each tensor plus 0.5 times its RMS, or 0.5 where it is all zero, times a standard
    normal), so a tensor that is zero at init (a BatchNorm shift) does not pass by being zero. The
    original model, its running statistics and the global generator are untouched. BatchNorm's eps
    makes the invariance approximate (relative error about eps / variance), hence the tolerance.
    """
    work = copy.deepcopy(model).train()
    g = torch.Generator().manual_seed(seed)
    x, y = batch
    with torch.no_grad():
        for p in work.parameters():
            rms = float(p.pow(2).mean().sqrt()) or 1.0
            p.add_(0.5 * rms * torch.randn(p.shape, generator=g, dtype=p.dtype))
        base = float(loss_fn(work(x), y))
        params = dict(work.named_parameters())
        sets = [[n] for n in params]
        for mname, module in work.named_modules():
            own = [f"{mname}.{n}" if mname else n for n, _ in module.named_parameters(recurse=False)]
            if len(own) > 1:
                sets.append(own)
        found: set[str] = set()
        for names in sets:
            keep = [params[n].detach().clone() for n in names]
            for n in names:
                params[n].mul_(factor)
            changed = float(loss_fn(work(x), y))
            for n, k in zip(names, keep):
                params[n].copy_(k)
            if abs(changed - base) <= rtol * max(abs(base), 1e-12):
                found.update(names)
    return [n for n in params if n in found]
