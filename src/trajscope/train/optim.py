"""Optimizer and learning-rate schedule factory.

The learning rate of step t (1-based: the rate used by the t-th update) is
``lr * schedule_factor(config, t)``; the trainer writes it into every param group before each
update, so a run resumed at any step uses exactly the rate the uninterrupted run used.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Iterable

import torch
from torch import nn

from trajscope.config import RunConfig


class MultiOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one (e.g. Muon for hidden matrices, AdamW for the rest).

    ``param_groups`` is the concatenation of the parts' groups, so setting ``group["lr"]`` reaches
    the right part; ``state_dict`` is ``{"parts": [part.state_dict(), ...]}``.
    """

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts
        self.defaults = {}
        self.state = {}

    @property
    def param_groups(self):  # type: ignore[override]
        return [g for part in self.parts for g in part.param_groups]

    def step(self, closure=None):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict) -> None:
        for part, sd in zip(self.parts, state_dict["parts"]):
            part.load_state_dict(sd)


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden 2-D weights for Muon, everything else for AdamW).

    "Hidden" means a 2-D parameter that is neither the first nor the last 2-D parameter in module
    order (those are the input embedding / first layer and the classifier, which Muon is not meant
    for). Convolution kernels (> 2-D), biases and normalization parameters go to AdamW.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.ndim == 2]
    hidden = {id(p) for p in matrices[1:-1]}
    return [p for p in params if id(p) in hidden], [p for p in params if id(p) not in hidden]


def copy_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """A new optimizer over ``model`` (:func:`make_optimizer`) with a deep copy of ``optimizer``'s
    state and groups, for a copy of the model that trains on its own. ``load_state_dict`` alone is
    not enough: it keeps every state tensor that already has the right dtype and device, so the two
    optimizers would update the same momentum buffers in place."""
    import copy

    out = make_optimizer(model, config)
    out.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return out


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    params: Iterable[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
    betas = (config.beta1, config.beta2)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay)
    if config.optimizer == "muon":
        hidden, rest = muon_split(model)
        parts: list[torch.optim.Optimizer] = []
        if hidden:
            parts.append(torch.optim.Muon(hidden, lr=config.lr, weight_decay=config.weight_decay,
                                          momentum=config.momentum or 0.95))
        parts.append(torch.optim.AdamW(rest, lr=config.lr, betas=betas, weight_decay=config.weight_decay))
        return MultiOptimizer(parts)
    if config.optimizer in LR_FREE:
        return _lr_free(params, config)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def schedule_factor(config: RunConfig, step: int) -> float:
    """Multiplier of ``config.lr`` for the ``step``-th update (step >= 1).

    constant: 1. warmup-cosine: linear warmup over ``warmup_steps`` (step/warmup), then
    0.5 (1 + cos(pi * progress)) down to 0 at ``steps``. step: ``step_gamma ** floor((step-1) /
    step_every)``. exp: ``exp_growth ** (step - 1)`` (an exponentially growing or decaying rate).
    """
    s = config.schedule
    if s == "constant":
        return 1.0
    if s == "warmup-cosine":
        w = config.warmup_steps
        if w > 0 and step <= w:
            return step / w
        span = max(config.steps - w, 1)
        progress = min(max(step - w, 0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if s == "step":
        return config.step_gamma ** ((step - 1) // config.step_every)
    if s == "exp":
        return config.exp_growth ** (step - 1)
    raise ValueError(f"unknown schedule {s!r}")


LR_FREE = ("prodigy", "schedulefree")


def _lr_free(params, config: RunConfig) -> torch.optim.Optimizer:
    """The learning-rate-free baselines (optional extra ``lrfree``), at their own defaults except
    ``lr``, ``betas`` and ``weight_decay`` from the config (use lr 1.0 for Prodigy, whose ``lr``
    scales its estimated step, and 0.0025 for schedule-free AdamW, their defaults).

    - ``prodigy``: ``prodigyopt.Prodigy`` (Mishchenko and Defazio 2023), Adam with an estimated
      distance-to-solution ``d`` as its step size; pair it with a cosine schedule, as its authors do.
    - ``schedulefree``: ``schedulefree.AdamWScheduleFree`` (Defazio et al. 2024); its own warmup is
      off (the config's schedule does it; use ``constant`` or a warmup), it is returned in train
      mode, and the Trainer evaluates with ``optimizer.eval()`` (the averaged weights).
    """
    from trajscope.errors import UsageError

    betas = (config.beta1, config.beta2)
    try:
        if config.optimizer == "prodigy":
            from prodigyopt import Prodigy

            # Prodigy prints "Using decoupled weight decay" to stdout, which would break a --json
            # command's one-object output: the note goes to stderr instead
            with contextlib.redirect_stdout(sys.stderr):
                return Prodigy(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay)
        from schedulefree import AdamWScheduleFree
    except ImportError:
        raise UsageError(f"optimizer {config.optimizer!r} needs the optional extra: "
                         "pip install 'trajscope[lrfree]'") from None
    opt = AdamWScheduleFree(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay, warmup_steps=0)
    opt.train()
    return opt
