"""The sharpness probe: the top Hessian eigenvalue against the optimizer's stability threshold.

Scalars (``<name>/<quantity>``, at STEP_END, when the parameters hold theta_step; with
``at="after_backward"`` at AFTER_BACKWARD, at theta_{step-1}, see :class:`SharpnessProbe`):

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
Cost and accuracy: every measurement runs Lanczos, warm-started from the probe's previous top
eigenvector (kept in :meth:`state_dict`; the first one from a random vector), until the relative
residual is below ``tol`` (default 1e-2), or the estimated relative eigenvalue error rho^2 / (gap
theta) is below ``value_tol`` (default: ``tol``;
:func:`~trajscope.functional.lanczos.value_error`; 0 turns this rule off), or after ``max_iter``
products. The products are forward differences of gradients with ReLU-type kinks frozen
(``method="auto"``, :mod:`trajscope.functional.fd_hvp`: one forward and backward pass each, plus one
for the base gradient), double backward where those do not apply (a model with another non-smooth
function, a loader) or where ``tol < 1e-3`` asks for more than they give. ``warm_iter=m`` caps a warm-started measurement at m >= 2 products (a Ritz
value never exceeds lambda_max, so that error is an underestimate).

Measured on mnist1d-cnn (SGD lr 0.1 momentum 0.9, the step's batch of 128, every 16 steps, against
Lanczos by double backward to 1e-6 on the same batch and parameters): the defaults spend 3.3-4.2
products per measurement (plus the base gradient), median relative error 4e-3, max 2.3e-2 (10
measurements over 160 steps: 4.3e-3 / 2.3e-2; 20 over 320 steps: 4.1e-3 / 2.3e-2), and cost about
4.7 training steps each on a shared, loaded CPU (1.29x the training time at every 16 steps in
``benchmarks/probe_overhead.py``, plain and probed runs interleaved step by step; 4.2 of those 4.7
are the gradients themselves). ``at="after_backward"`` saves the base
backward pass (measured at theta_{step-1}: 4.0 products there, median / max error 2.3e-3 / 1.1e-2).
Tighter: ``value_tol=0`` (residual rule only) 6 products, median 5e-4 (max 2.8e-3, the forward
difference's own error); ``method="double-backward", value_tol=0``: 6 products of about 2.5 training
steps each, median 4.5e-5 (max 7.4e-4).
"""

from __future__ import annotations

from typing import Any

import torch

from trajscope.events import Event, StepContext
from trajscope.functional.hessian import (adam_preconditioner, is_adam, stability_threshold,
                                          top_hessian_eigenvalues)
from trajscope.functional.hvp import flatten, trainable_parameters
from trajscope.probes.base import BatchProbe, register


DIFFERENCE_MIN_TOL = 1e-3  # "auto" below this tol: double backward (differences err by up to ~3e-3)
AT = {"step_end": Event.STEP_END, "after_backward": Event.AFTER_BACKWARD}


@register
class SharpnessProbe(BatchProbe):
    """Top Hessian eigenvalue (and Adam's preconditioned one) vs the stability threshold.

    ``data="batch"`` measures on the step's batch (``ctx.batch``); ``data="fixed"`` on the first
    ``fixed_size`` training examples of ``ctx.data`` (the same set every time). ``every=n`` is a
    shorthand for ``schedule=every(n)``; the default schedule is the sparse log-spaced one of
    :class:`~trajscope.probes.base.Probe`. ``tol``, ``max_iter``: Lanczos stopping rule;
    ``value_tol``: stop at this estimated relative eigenvalue error (None: ``tol``; 0: off);
    ``warm_iter``: the most products of a warm-started measurement (module docstring; None: as cold);
    ``method`` (default ``"auto"``: finite differences where they apply and ``tol >= 1e-3``, else double
    backward), ``curvature``, ``train``: see :mod:`trajscope.functional.hessian`.

    ``at="after_backward"`` measures at AFTER_BACKWARD instead of STEP_END: at theta_{step-1}, the
    point the step's gradient was taken at, on the step's batch, and the finite differences reuse
    that gradient (``p.grad``) as their base one instead of computing it (one backward pass less per
    measurement). Only where ``p.grad`` is exactly the gradient of ``ctx.loss`` on ``ctx.batch``:
    the reference Trainer; not with gradient accumulation over micro-batches or clipping before
    AFTER_BACKWARD. It is reused only if the base forward pass gives ``ctx.loss`` again (same
    batch, parameters and loss), all trainable parameters have a gradient and no process group of
    more than one rank is running (DDP averages gradients over ranks); otherwise it is computed.
    It is not the default because it measures another point: on mnist1d-cnn (SGD lr 0.1, momentum
    0.9, the step's batch) lambda_max at theta_{step-1} differed from the one at theta_step by 3-36%
    (median 11%, 9 steps), far more than the 4e-3 error of the measurement.
    """

    default_name = "sharpness"
    needs = frozenset({"batch", "loss_fn", "optimizer"})

    def __init__(self, schedule=None, name: str | None = None, *, every: int | None = None,
                 data: str = "batch", fixed_size: int = 1024, tol: float = 1e-2, max_iter: int = 30,
                 warm_iter: int | None = None, method: str = "auto", curvature: str = "hessian",
                 train: bool | None = True, seed: int = 0, value_tol: float | None = None,
                 at: str = "step_end"):
        super().__init__(schedule, name, every=every, data=data, fixed_size=fixed_size)
        if at not in AT:
            raise ValueError(f"at must be one of {tuple(AT)}, got {at!r}")
        self.at, self.event = at, AT[at]
        if warm_iter is not None and warm_iter < 2:  # one product cannot move the warm vector
            raise ValueError(f"warm_iter must be >= 2 or None, got {warm_iter}")
        self.tol, self.max_iter, self.warm_iter = tol, max_iter, warm_iter
        self.value_tol = tol if value_tol is None else value_tol
        if method == "auto" and tol < DIFFERENCE_MIN_TOL:  # asked for more than differences give
            method = "double-backward"
        self.kwargs = {"method": method, "curvature": curvature, "train": train}
        self.generator = torch.Generator().manual_seed(seed)
        self._vectors: dict[str, torch.Tensor] = {}

    def _step_gradient(self, ctx: StepContext):
        """(loss, flat gradient) of the training step, where ``at="after_backward"`` may reuse it."""
        if self.at != "after_backward" or self.data != "batch" or ctx.loss is None \
                or self.kwargs["train"] is not True:
            return None
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            return None
        grads = [p.grad for _, p in trainable_parameters(ctx.model)]
        if any(g is None for g in grads):
            return None
        return float(ctx.loss.detach()), flatten([g.detach() for g in grads])

    def _top(self, key: str, ctx: StepContext, batch, precondition=None, base=None):
        """Top eigenpair, warm-started from (and updating) the stored vector ``key``."""
        v0 = self._vectors.get(key)
        dim = sum(p.numel() for _, p in trainable_parameters(ctx.model))
        if v0 is not None and v0.numel() != dim:
            v0 = None
        budget = self.max_iter if v0 is None or self.warm_iter is None else min(self.warm_iter, self.max_iter)
        eig = top_hessian_eigenvalues(ctx.model, ctx.loss_fn, batch, 1, tol=self.tol, max_iter=budget,
                                      v0=v0, generator=self.generator, precondition=precondition,
                                      value_tol=self.value_tol, base=base, **self.kwargs)
        self._vectors[key] = eig.vectors[0].detach().clone()
        return float(eig.values[0]), float(eig.residuals[0]), eig.n_iter

    def measure(self, ctx: StepContext) -> dict[str, float]:
        batch = self.examples(ctx)
        base = self._step_gradient(ctx)
        lam, res, n_iter = self._top("hessian", ctx, batch, base=base)
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
            compared, _, _ = self._top("preconditioned", ctx, batch, precondition=pre, base=base)
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
