"""The gradient-noise probe: noise scale, gradient signal-to-noise and the top-eigenspace overlap.

Scalars (``<name>/<quantity>``, at STEP_END, parameters theta_step; definitions and estimators in
:mod:`trajscope.functional.noise`):

- ``b_simple``: the simple noise scale tr(Sigma) / |G|^2 (unbiased numerator and denominator), in
  examples; ``trace_cov``: tr(Sigma); ``grad_sq_norm``: the unbiased estimate of |G|^2;
- ``snr``: the gradient signal-to-noise ratio, g_bar_j^2 / s_j^2 averaged over all trainable scalar
  parameters (``snr/<tensor>`` per parameter tensor with ``per_tensor=True``);
- ``top_overlap`` (``top_k`` > 0): |P_k g|^2 / |g|^2, the fraction of the batch gradient's squared
  norm in the span of the top ``top_k`` Hessian eigenvectors of the same batch (Gur-Ari et al. 2018),
  by Lanczos (``tol``, ``max_iter``; warm-started from the previous top eigenvector), train mode.

The examples: ``data="batch"`` the step's batch (``ctx.batch``, the one the step was taken on, now at
theta_step); ``data="fixed"`` the first ``fixed_size`` training examples of ``ctx.data``. Per-sample
gradients in eval mode (``train=False``, see the functional module for BatchNorm).
Cost: one vmapped per-sample backward over the batch, plus about ``max_iter`` Hessian-vector
products when ``top_k`` > 0 (set ``top_k=0`` to skip the overlap).
"""

from __future__ import annotations

from typing import Any

import torch

from trajscope.events import StepContext
from trajscope.functional.noise import gradient_moments, gradient_snr, gradient_top_overlap, noise_scale
from trajscope.probes.base import BatchProbe, register


@register
class NoiseProbe(BatchProbe):
    """Gradient noise scale, signal-to-noise ratio and top-eigenspace overlap (module docstring)."""

    default_name = "noise"
    needs = frozenset({"batch", "loss_fn"})

    def __init__(self, schedule=None, name: str | None = None, *, every: int | None = None,
                 data: str = "batch", fixed_size: int = 256, chunk_size: int = 64, train: bool = False,
                 per_tensor: bool = False, top_k: int = 2, tol: float = 1e-2, max_iter: int = 20,
                 seed: int = 0):
        super().__init__(schedule, name, every=every, data=data, fixed_size=fixed_size)
        self.chunk_size, self.train = chunk_size, train
        self.per_tensor, self.top_k, self.tol, self.max_iter = per_tensor, top_k, tol, max_iter
        self.generator = torch.Generator().manual_seed(seed)
        self._v0: torch.Tensor | None = None

    def measure(self, ctx: StepContext) -> dict[str, float]:
        x, y = self.examples(ctx)
        mom = gradient_moments(ctx.model, ctx.loss_fn, x, y, chunk_size=self.chunk_size, train=self.train)
        ns = noise_scale(mom)
        groups = {"all": list(mom.total), **({n: [n] for n in mom.total} if self.per_tensor else {})}
        snr = gradient_snr(mom, groups)
        out = {"b_simple": ns.b_simple, "trace_cov": ns.trace_cov, "grad_sq_norm": ns.grad_sq_norm,
               "snr": snr.pop("all")}
        out.update({f"snr/{n}": v for n, v in snr.items()})
        if self.top_k > 0:
            out["top_overlap"] = self._overlap(ctx, (x, y))
        return out

    def _overlap(self, ctx: StepContext, batch) -> float:
        v0 = self._v0
        if v0 is not None and v0.numel() != sum(p.numel() for p in ctx.model.parameters() if p.requires_grad):
            v0 = None
        overlap, eig = gradient_top_overlap(ctx.model, ctx.loss_fn, batch, self.top_k, tol=self.tol,
                                            max_iter=self.max_iter, v0=v0, generator=self.generator)
        self._v0 = eig.vectors[0].detach().clone()
        return overlap

    def state_dict(self) -> dict[str, Any]:
        """The Lanczos warm-start vector (flat (P,)) and the random generator's state."""
        return {"v0": None if self._v0 is None else self._v0.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._v0 = state.get("v0")
        if "generator" in state:
            self.generator.set_state(state["generator"])
