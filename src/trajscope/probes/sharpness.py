"""The sharpness probe: the top Hessian eigenvalue against the optimizer's stability threshold.

Scalars (``<name>/<quantity>``, at STEP_END, when the parameters hold theta_step):

- ``lambda_max``: the largest eigenvalue of the Hessian of the mean training loss on the measured
  batch (all parameters with requires_grad; BatchNorm in train mode, no side effect on the model;
  weight decay not included);
- ``stability_threshold``: :func:`~trajscope.functional.hessian.stability_threshold` of the optimizer
  at the learning rate of this step (2/eta, (2 + 2 beta)/eta with momentum, Adam's form);
- ``preconditioned_lambda_max`` (Adam/AdamW only): the top eigenvalue of P^{-1/2} H P^{-1/2}, P Adam's
  preconditioner (:func:`~trajscope.functional.hessian.adam_preconditioner`);
- ``stability_ratio``: the compared quantity over the threshold: ``lambda_max`` / threshold for SGD,
  ``preconditioned_lambda_max`` / threshold for Adam (> 1: beyond the edge of stability);
- ``residual``: the relative Lanczos residual of the reported eigenpair, an error bound (some
  eigenvalue lies within ``residual * lambda_max``; the Ritz value error is usually far smaller);
- ``iterations``: Hessian-vector products spent on ``lambda_max`` (the cost of the measurement).

An optimizer without a known threshold (e.g. Muon) gets ``lambda_max``, ``residual`` and
``iterations`` only.
Cost and accuracy: every measurement runs Lanczos until the relative residual is below ``tol``
(default 1e-2) or ``max_iter`` products, warm-started from the probe's previous top eigenvector
(kept in :meth:`state_dict`; the first one from a random vector). ``value_tol`` also stops once
the estimated relative eigenvalue error rho^2 / (gap theta) is below it
(:func:`~trajscope.functional.lanczos.value_error`). ``warm_iter=m`` caps a warm-started
measurement at m >= 2 products (the top Ritz value of the m-step Krylov space of the previous
vector); a Ritz value never exceeds lambda_max, so the error is an underestimate. Measured on
mnist1d-cnn (SGD lr 0.1 momentum 0.9, the step's batch of 128, every 16 steps, 800 steps, against
Lanczos to 1e-6): the defaults need 6.1 products on average, median relative error 4.5e-5 (max
7.4e-4); ``value_tol=3e-3``: 5.2 products, median 5.9e-4 (max 3.6e-3); ``warm_iter=3``: 3.1
products but median 6e-2 (max 0.36), because the top eigenvector of the step's minibatch Hessian
turns a long way in 16 steps, so a short warm-started run is not accurate there.
"""

from __future__ import annotations

from typing import Any

import torch

from trajscope.events import StepContext
from trajscope.functional.hessian import (adam_preconditioner, is_adam, stability_threshold,
                                          top_hessian_eigenvalues)
from trajscope.functional.hvp import trainable_parameters
from trajscope.probes.base import BatchProbe, register


@register
class SharpnessProbe(BatchProbe):
    """Top Hessian eigenvalue (and Adam's preconditioned one) vs the stability threshold.

    ``data="batch"`` measures on the step's batch (``ctx.batch``); ``data="fixed"`` on the first
    ``fixed_size`` training examples of ``ctx.data`` (the same set every time). ``every=n`` is a
    shorthand for ``schedule=every(n)``; the default schedule is the sparse log-spaced one of
    :class:`~trajscope.probes.base.Probe`. ``tol``, ``max_iter``: Lanczos stopping rule;
    ``warm_iter``: the most products of a warm-started measurement (module docstring; None: as cold);
    ``method``, ``curvature``, ``train``: see :mod:`trajscope.functional.hessian`.
    """

    default_name = "sharpness"
    needs = frozenset({"batch", "loss_fn", "optimizer"})

    def __init__(self, schedule=None, name: str | None = None, *, every: int | None = None,
                 data: str = "batch", fixed_size: int = 1024, tol: float = 1e-2, max_iter: int = 30,
                 warm_iter: int | None = None, method: str = "double-backward", curvature: str = "hessian",
                 train: bool | None = True, seed: int = 0, value_tol: float | None = None):
        super().__init__(schedule, name, every=every, data=data, fixed_size=fixed_size)
        if warm_iter is not None and warm_iter < 2:  # one product cannot move the warm vector
            raise ValueError(f"warm_iter must be >= 2 or None, got {warm_iter}")
        self.tol, self.max_iter, self.warm_iter = tol, max_iter, warm_iter
        self.value_tol = value_tol
        self.kwargs = {"method": method, "curvature": curvature, "train": train}
        self.generator = torch.Generator().manual_seed(seed)
        self._vectors: dict[str, torch.Tensor] = {}

    def _top(self, key: str, ctx: StepContext, batch, precondition=None):
        """Top eigenpair, warm-started from (and updating) the stored vector ``key``."""
        v0 = self._vectors.get(key)
        dim = sum(p.numel() for _, p in trainable_parameters(ctx.model))
        if v0 is not None and v0.numel() != dim:
            v0 = None
        budget = self.max_iter if v0 is None or self.warm_iter is None else min(self.warm_iter, self.max_iter)
        eig = top_hessian_eigenvalues(ctx.model, ctx.loss_fn, batch, 1, tol=self.tol, max_iter=budget,
                                      v0=v0, generator=self.generator, precondition=precondition,
                                      value_tol=self.value_tol, **self.kwargs)
        self._vectors[key] = eig.vectors[0].detach().clone()
        return float(eig.values[0]), float(eig.residuals[0]), eig.n_iter

    def measure(self, ctx: StepContext) -> dict[str, float]:
        batch = self.examples(ctx)
        lam, res, n_iter = self._top("hessian", ctx, batch)
        out = {"lambda_max": lam, "residual": res, "iterations": n_iter}
        try:
            threshold = stability_threshold(ctx.optimizer)
        except ValueError:
            return out
        compared = lam
        out["stability_threshold"] = threshold
        if is_adam(ctx.optimizer):
            try:
                pre = adam_preconditioner(ctx.optimizer, [p for _, p in trainable_parameters(ctx.model)])
            except ValueError:  # no second moments yet (before the first step)
                return out
            compared, _, _ = self._top("preconditioned", ctx, batch, precondition=pre)
            out["preconditioned_lambda_max"] = compared
        out["stability_ratio"] = compared / threshold
        return out

    def state_dict(self) -> dict[str, Any]:
        """The warm-start vectors (flat (P,) tensors) and the random generator's state."""
        return {"vectors": {k: v.clone() for k, v in self._vectors.items()},
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._vectors = {k: v.clone() for k, v in state.get("vectors", {}).items()}
        if "generator" in state:
            self.generator.set_state(state["generator"])
