"""``explr``: weight decay or the equivalent exponential learning rate on the scale-invariant
parameters only (Li and Arora 2020; :mod:`trajscope.functional.explr`).

The theorem covers parameters the loss is invariant to the scale of (a weight followed by
BatchNorm). A network also has others (BatchNorm's scale and shift before a read-out, the read-out
itself), and giving those weight decay or a growing rate breaks the equivalence for reasons outside
the theorem. This controller therefore acts on the scale-invariant parameters only (``invariant``,
or found numerically on the first 256 training examples at FIT_START with
:func:`~trajscope.functional.explr.scale_invariant_names`); the rest train with the config's plain
rate and no weight decay in both modes. With eta the config's (constant) rate:

- ``mode="wd"``: weight decay ``weight_decay`` on them: ``grad += weight_decay * p`` before the
  optimizer step (what ``torch.optim.SGD``'s own weight decay does);
- ``mode="exp"``: no weight decay and the rate eta_t = eta alpha^(-2t-1) for update t (0-based),
  alpha from (eta, ``config.momentum``, ``weight_decay``). The optimizer keeps its one rate eta, so
  the controller runs SGD's momentum recursion B = gamma B + g, p -= eta_t B in eta's units: before
  update t it multiplies the gradient by eta_t / eta and the momentum buffer by
  eta_t / eta_{t-1} = alpha^-2 (t >= 1), so that the buffer holds (eta_t / eta) B. With
  ``seed_momentum`` (default) the buffer starts at (eta_0 / eta) c theta_0, c = (alpha - 1 +
  eta lambda) / (eta gamma), instead of empty, so that the first update shrinks theta by alpha as
  the equivalence needs (the weight-decay run shrinks by 1 - eta lambda); without it the runs
  differ from step 1 by the radial component of
  :func:`~trajscope.functional.explr.first_step_mismatch`, which momentum accumulates.

Everything it changes lives in the optimizer's state (checkpointed), so a run resumes exactly. The
recorder's ``grad_norm`` is of the modified gradients. Needs ``optimizer="sgd"``,
``weight_decay=0`` and ``schedule="constant"`` in the config; it refuses anything else in one line.
"""

from __future__ import annotations

import dataclasses
import torch

from trajscope.controllers.base import Controller, register
from trajscope.errors import UsageError
from trajscope.events import StepContext
from trajscope.functional.explr import exp_lr_alpha, exp_lr_at, scale_invariant_names

MODES = ("wd", "exp")


@dataclasses.dataclass
class ExpLRState:
    """The split: how many tensors and scalars are in the scale-invariant group."""

    invariant_tensors: int = 0
    invariant_numel: int = 0
    invariant: list = dataclasses.field(default_factory=list)  # their names


@register
class ExpLRController(Controller):
    """Weight decay (``wd``) or its equivalent exponential rate (``exp``) on the scale-invariant group."""

    default_name = "explr"
    needs = frozenset({"optimizer", "data"})

    def __init__(self, name: str | None = None, *, mode: str = "wd", weight_decay: float = 5e-4,
                 invariant: list[str] | None = None, seed_momentum: bool = True):
        super().__init__(name)
        if mode not in MODES:
            raise UsageError(f"explr: unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
        self.mode, self.weight_decay, self.invariant = mode, float(weight_decay), invariant
        self.seed_momentum = bool(seed_momentum)
        self.state = ExpLRState()
        self._params: list = []

    def on_fit_start(self, ctx: StepContext) -> None:
        self.check(ctx)
        cfg = ctx.config
        if cfg.optimizer != "sgd" or cfg.weight_decay != 0 or cfg.schedule != "constant":
            raise UsageError("explr: needs optimizer sgd, weight_decay 0 and schedule constant in the config "
                             f"(got {cfg.optimizer}, {cfg.weight_decay}, {cfg.schedule})")
        names = self.invariant
        if ctx.step > 0 and self.state.invariant:  # resumed: the split of the interrupted run
            names = list(self.state.invariant)
        if names is None:
            batch = (ctx.data.x_train[:256], ctx.data.y_train[:256])
            names = scale_invariant_names(ctx.model, ctx.loss_fn, batch)
        params = dict(ctx.model.named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise UsageError(f"explr: the model has no parameter {unknown[0]!r}")
        self._params = [params[n] for n in names]
        self.state = ExpLRState(len(names), sum(params[n].numel() for n in names), list(names))
        if ctx.step > 0:  # resumed: the buffers come back with the optimizer's state
            return
        if self.mode == "exp" and self.seed_momentum and cfg.momentum > 0:
            alpha = exp_lr_alpha(cfg.lr, cfg.momentum, self.weight_decay)
            c = (alpha - 1.0 + cfg.lr * self.weight_decay) / (cfg.lr * cfg.momentum)
            r0 = exp_lr_at(cfg.lr, cfg.momentum, self.weight_decay, 0) / cfg.lr
            for p in self._params:  # SGD's first step then makes buf = gamma * buf + grad
                ctx.optimizer.state[p]["momentum_buffer"] = (r0 * c) * p.detach().clone()
        self.decide(ctx, f"{self.mode} on {len(names)} scale-invariant tensors", reason="Li and Arora equivalence",
                    evidence={"invariant": list(names)})

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        cfg, t = ctx.config, ctx.step - 1
        with torch.no_grad():
            if self.mode == "wd":
                for p in self._params:
                    if p.grad is not None:
                        p.grad.add_(p, alpha=self.weight_decay)
                return
            ratio = exp_lr_at(cfg.lr, cfg.momentum, self.weight_decay, t) / cfg.lr
            growth = exp_lr_alpha(cfg.lr, cfg.momentum, self.weight_decay) ** -2
            for p in self._params:
                if p.grad is not None:
                    p.grad.mul_(ratio)
                buf = ctx.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None and t >= 1:
                    buf.mul_(growth)
