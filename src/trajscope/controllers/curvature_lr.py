"""Learning rate from curvature: eta = c * T / lambda, lambda measured after a short warm-up.

The quantity: ``lambda`` is the top eigenvalue of the Hessian of the mean training loss on a fixed
set of training examples (the first ``examples``, by default one batch; all trainable parameters;
BatchNorm in train mode without side effects), for Adam/AdamW of the preconditioned Hessian
P^{-1/2} H P^{-1/2} (P Adam's sqrt(v_hat) + eps, :func:`~trajscope.functional.hessian.adam_preconditioner`). ``T`` is the rate-free
part of the optimizer's stability threshold, ``stability_threshold(optimizer) * lr``: 2 for plain
SGD, 2 + 2 beta for heavy-ball momentum beta, (2 + 2 beta1) / (1 - beta1) for Adam. The ratio
``r = eta lambda / T`` is the stability ratio: r = 1 is the edge of stability. SGD's weight decay is
an L2 term in its gradient, so it adds ``weight_decay`` to every eigenvalue of the loss Hessian:
for SGD ``lambda`` is the loss Hessian's top eigenvalue plus ``weight_decay``
(:func:`coupled_weight_decay`; without it a workload with a large L2 term and a flat loss at init,
modadd-mlp with weight decay 5, gets a warm-up rate far beyond the decay's own limit 2 / wd and
diverges). AdamW's decay is decoupled and left out; Adam's L2 term is preconditioned with the loss
and left out too (documented, not modelled).

Regime boundaries in r (reported with every choice, :func:`regimes`): r < 1 stable (lazy in the
catapult picture, eta < 2/lambda_0); 1 < r < 2 catapult (theory: eta_max = 4/lambda_0); 2 < r < 6
catapult for ReLU nets (eta_max ~ 12/lambda_0, Lewkowycz et al. 2020); r > 6 divergent.

Why measure after a warm-up, and why c = 1/2: CONTEXT.md measures on mnist1d-mlp that the sharpness
rises fast in the first steps (lambda_0 = 0.87 at init; best eta = 0.25 there, which is r = 0.06 at
init, and r = 0.13 already trained much worse), so a rule on lambda_0 places the rate far too high.
Here the model first takes ``warmup`` steps at a rate deep in the stable regime (r_0 = 1/16 of the
threshold at init), which lets the fast early rise happen without catapulting; lambda after it is
measured and the rate set to c = 1/2 of its threshold. The sharpness keeps rising after the warm-up
(progressive sharpening: measured here on mnist1d-mlp, lambda doubles from step 50 to 100 at a
small rate), so a rate at half the threshold reaches the edge of stability, where the catapult
results place the best fixed-compute performance, within the first hundreds of steps instead of at
the first step, which the CONTEXT.md measurement shows hurts. The early race
(:mod:`trajscope.controllers.race`) then checks a factor-of-2 grid around this estimate on evidence.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from trajscope.controllers.lr_common import Compute, ShortLoop
from trajscope.errors import TrajscopeError, UsageError
from trajscope.functional.hessian import (adam_preconditioner, is_adam, stability_threshold,
                                          top_hessian_eigenvalues)
from trajscope.functional.hvp import trainable_parameters

C_RATE = 0.5     # the chosen stability ratio r = eta lambda / T (see the module docstring)
C_WARMUP = 1 / 16  # the warm-up's stability ratio against lambda at init
INIT_ITER = 8      # Lanczos products for lambda at init: it only sets the warm-up rate (a Ritz value
#                    is a lower bound, so the warm-up rate errs high by at most the Ritz error)
MAX_EXAMPLES = 128  # default examples for lambda: one batch, at most this many
BOUNDARIES = {"stable": (0.0, 1.0), "catapult": (1.0, 2.0), "catapult-relu": (2.0, 6.0),
              "divergent": (6.0, float("inf"))}


def rate_from_curvature(lam: float, threshold_unit: float, c: float = C_RATE) -> float:
    """eta = c * T / lambda (lambda > 0)."""
    if not lam > 0:
        raise ValueError(f"the measured curvature must be positive, got {lam}")
    return c * threshold_unit / lam


def regimes(lam: float, threshold_unit: float) -> dict[str, list[float]]:
    """Each regime's rate interval [eta_lo, eta_hi) for curvature ``lam`` (see the module docstring)."""
    return {name: [lo * threshold_unit / lam, hi * threshold_unit / lam] for name, (lo, hi) in BOUNDARIES.items()}


def regime_of(ratio: float) -> str:
    """The regime (a key of ``BOUNDARIES``) that the stability ratio ``ratio`` falls in."""
    return next(name for name, (lo, hi) in BOUNDARIES.items() if lo <= ratio < hi)


def threshold_unit(optimizer: torch.optim.Optimizer) -> float:
    """T = stability_threshold(optimizer) * lr, the rate-free part of the threshold (lr > 0)."""
    try:
        return stability_threshold(optimizer) * float(optimizer.param_groups[0]["lr"])
    except ValueError:
        raise UsageError(f"the curvature rule needs an optimizer with a known stability threshold "
                         f"(sgd, adam, adamw), not {type(optimizer).__name__}") from None


def coupled_weight_decay(optimizer: torch.optim.Optimizer) -> float:
    """The L2 coefficient that SGD adds to its gradient (so to every Hessian eigenvalue); 0 for
    other optimizers (AdamW decouples it; see the module docstring for Adam)."""
    if isinstance(optimizer, torch.optim.SGD):
        return max(float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups)
    return 0.0


def sharpness(model, loss_fn, batch, optimizer, *, tol: float = 1e-2, max_iter: int = 30,
              generator: torch.Generator | None = None) -> tuple[float, int]:
    """(lambda, HVPs spent): the top Hessian eigenvalue on ``batch``, preconditioned for Adam."""
    pre = None
    if is_adam(optimizer):
        pre = adam_preconditioner(optimizer, [p for _, p in trainable_parameters(model)])
    try:
        eig = top_hessian_eigenvalues(model, loss_fn, batch, 1, tol=tol, max_iter=max_iter, generator=generator,
                                      precondition=pre)
    except RuntimeError as e:  # e.g. eigh of a tridiagonal with non-finite entries: the model blew up
        raise TrajscopeError(f"the top Hessian eigenvalue could not be measured: {str(e).splitlines()[0]}") from None
    lam = float(eig.values[0])
    if not math.isfinite(lam):
        raise TrajscopeError(f"the top Hessian eigenvalue is {lam}: the loss or the weights are not finite")
    return lam, int(eig.n_iter)


def curvature_select(loop: ShortLoop, warmup: int, examples: int = MAX_EXAMPLES, c: float = C_RATE,
                     c_warmup: float = C_WARMUP, tol: float = 5e-2, max_iter: int = 15,
                     init_iter: int = INIT_ITER) -> dict[str, Any]:
    """Measure lambda at init (``init_iter`` Lanczos products), warm up ``warmup`` steps at
    ``c_warmup * T / lambda_0``, measure lambda again (relative residual ``tol``, at most
    ``max_iter`` products) and return the choice with its evidence (see the module docstring).
    Both lambdas include SGD's weight decay (:func:`coupled_weight_decay`).

    Adam's preconditioner needs second moments, so for Adam the first warm-up step is taken at rate
    0 (it fills the moments and leaves the weights as they are) and lambda_0 is measured after it.
    The result: ``lr``, ``lambda``, ``lambda_0``, ``warmup_lr``, ``threshold_unit``, ``c``,
    ``ratio`` (= c), ``regimes``, ``hvps`` and ``compute`` (a :class:`Compute`).
    """
    opt = loop.optimizer
    t_unit = threshold_unit(opt)
    batch = loop.fixed_batch(examples)
    n_ex = len(batch[0])
    gen = torch.Generator().manual_seed(loop.config.seed)
    t = 0
    if is_adam(opt):
        t += 1
        loop.step(t, 0.0)
    t0 = time.perf_counter()
    wd = coupled_weight_decay(opt)
    lam0, n0 = sharpness(loop.model, loop.loss_fn, batch, opt, tol=tol, max_iter=init_iter, generator=gen)
    lam0 += wd
    wall = time.perf_counter() - t0
    if not lam0 > 0:
        raise UsageError(f"the top Hessian eigenvalue at init is {lam0:.3g} (not positive): no curvature rule")
    warmup_lr = rate_from_curvature(lam0, t_unit, c_warmup)
    losses = []
    while t < warmup:
        t += 1
        losses.append(loop.step(t, warmup_lr))
        if not math.isfinite(losses[-1]):
            raise TrajscopeError(f"the curvature warm-up diverged at step {t} (lr {warmup_lr:.3g}, loss {losses[-1]})")
    t0 = time.perf_counter()
    lam, n1 = sharpness(loop.model, loop.loss_fn, batch, opt, tol=tol, max_iter=max_iter, generator=gen)
    lam += wd
    wall += time.perf_counter() - t0
    if not lam > 0:
        raise UsageError(f"the top Hessian eigenvalue after the warm-up is {lam:.3g} (not positive)")
    compute = loop.compute.add(Compute(loop.compute.batch_size, hvps=n0 + n1, hvp_examples=n_ex, wall_s=wall))
    lr = rate_from_curvature(lam, t_unit, c)
    return {"lr": lr, "lambda": lam, "lambda_0": lam0, "warmup_steps": t, "warmup_lr": warmup_lr,
            "warmup_loss": losses[-1] if losses else None, "threshold_unit": t_unit, "c": c, "ratio": c,
            "preconditioned": is_adam(opt), "weight_decay_added": wd, "examples": n_ex, "hvps": n0 + n1, "regimes": regimes(lam, t_unit),
            "regime": regime_of(c), "compute": compute}
