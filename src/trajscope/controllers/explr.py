"""``explr``: weight decay or the equivalent exponential learning rate on the scale-invariant
parameters only (Li and Arora 2020; :mod:`trajscope.functional.explr`).

The theorem covers parameters the loss is invariant to the scale of (a weight followed by
BatchNorm). A network also has others (BatchNorm's scale and shift, a linear read-out), and giving
those weight decay or a growing rate breaks the equivalence for reasons outside the theorem. This
controller therefore splits the optimizer's parameters into two groups at FIT_START: the
scale-invariant ones (``invariant``, or found numerically on the first 256 training examples with
:func:`~trajscope.functional.explr.scale_invariant_names`) and the rest. The rest train with the
config's plain rate and no weight decay in both modes; the scale-invariant group gets

- ``mode="wd"``: weight decay ``weight_decay`` at the config's fixed rate, or
- ``mode="exp"``: no weight decay and the rate eta alpha^(-2(t-1)-1) for the t-th update, alpha
  from (``config.lr``, ``config.momentum``, ``weight_decay``). With ``seed_momentum`` (default)
  the group's momentum buffer starts at (alpha - 1 + eta lambda) theta_0 / (eta gamma) instead of
  empty, so that the first update shrinks by alpha as the equivalence needs (the weight-decay run
  shrinks by 1 - eta lambda); without it the runs differ from step 1 by the radial component of
  :func:`~trajscope.functional.explr.first_step_mismatch`, which momentum accumulates.

Use it with ``optimizer="sgd"``, ``weight_decay=0`` and ``schedule="constant"`` in the config; it
refuses anything else in one line. A run with this controller cannot be resumed from a checkpoint
(its optimizer has two parameter groups; the trainer restores the optimizer before FIT_START).
"""

from __future__ import annotations

import dataclasses
from typing import Any

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
        self._group = None

    def on_fit_start(self, ctx: StepContext) -> None:
        self.check(ctx)
        cfg = ctx.config
        if cfg.optimizer != "sgd" or cfg.weight_decay != 0 or cfg.schedule != "constant":
            raise UsageError("explr: needs optimizer sgd, weight_decay 0 and schedule constant in the config "
                             f"(got {cfg.optimizer}, {cfg.weight_decay}, {cfg.schedule})")
        if ctx.step > 0:
            raise UsageError("explr: a run with this controller cannot be resumed; train it again")
        names = self.invariant
        if names is None:
            batch = (ctx.data.x_train[:256], ctx.data.y_train[:256])
            names = scale_invariant_names(ctx.model, ctx.loss_fn, batch)
        params = dict(ctx.model.named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise UsageError(f"explr: the model has no parameter {unknown[0]!r}")
        chosen = {id(params[n]) for n in names}
        opt = ctx.optimizer
        if len(opt.param_groups) != 1:
            raise UsageError("explr: expects the optimizer to have one parameter group")
        group = opt.param_groups[0]
        group["params"] = [p for p in group["params"] if id(p) not in chosen]
        opt.add_param_group({"params": [params[n] for n in names],
                             "weight_decay": self.weight_decay if self.mode == "wd" else 0.0})
        self._group = opt.param_groups[-1]
        if self.mode == "exp" and self.seed_momentum and cfg.momentum > 0:
            alpha = exp_lr_alpha(cfg.lr, cfg.momentum, self.weight_decay)
            c = (alpha - 1.0 + cfg.lr * self.weight_decay) / (cfg.lr * cfg.momentum)
            for n in names:  # SGD's first step then makes buf = gamma * buf + grad
                opt.state[params[n]]["momentum_buffer"] = c * params[n].detach().clone()
        self.state = ExpLRState(len(names), sum(params[n].numel() for n in names))
        self.decide(ctx, f"{self.mode} on {len(names)} scale-invariant tensors", reason="Li and Arora equivalence",
                    evidence={"invariant": list(names)})

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        if self.mode == "exp" and self._group is not None:
            cfg = ctx.config
            self._group["lr"] = exp_lr_at(cfg.lr, cfg.momentum, self.weight_decay, ctx.step - 1)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.state)
