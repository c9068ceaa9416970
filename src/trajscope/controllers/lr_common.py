"""What the learning-rate selectors share: compute accounting and a short plain training loop.

:class:`Compute` counts what choosing a rate costs: optimizer steps, Hessian-vector products,
forward-only evaluations and wall time. Its ``step_equivalents`` converts HVPs and forwards into
training steps so that methods compare on one axis: an HVP by double backward is one forward, one
backward and one backward of the backward, about two forward-backward passes (DESIGN: double
backward is the faster HVP on these models), so an HVP on ``n`` examples counts ``2 n /
batch_size`` steps; a forward pass is about a third of a forward-backward step (the backward costs
about two forwards), so a forward on ``n`` examples counts ``n / (3 batch_size)`` steps.

:class:`ShortLoop` is a workload's model, optimizer and batches exactly as the
:class:`~trajscope.train.Trainer` makes them (same seed, same initial weights, same batch of step t),
stepped at a rate the caller gives, for the few steps a range test or a warm-up needs. It can also
wrap a user's own model and tensors.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from trajscope.config import RunConfig

LossFn = Callable[[Tensor, Tensor], Tensor]

HVP_COST = 2.0  # forward-backward passes per example of one double-backward HVP (see the docstring)
FORWARD_COST = 1 / 3  # forward-backward passes per example of one forward-only evaluation


@dataclass
class Compute:
    """What choosing a rate cost. ``steps``: optimizer steps (each on ``batch_size`` examples);
    ``hvps``: Hessian-vector products, each on ``hvp_examples`` examples; ``forward_examples``:
    examples passed forward only (evaluations), in total; ``wall_s``: seconds."""

    batch_size: int
    steps: int = 0
    hvps: int = 0
    hvp_examples: int = 0
    wall_s: float = 0.0
    forward_examples: int = 0

    @property
    def step_equivalents(self) -> float:
        """``steps + (HVP_COST * hvps * hvp_examples + FORWARD_COST * forward_examples) / batch_size``."""
        return self.steps + (HVP_COST * self.hvps * self.hvp_examples
                             + FORWARD_COST * self.forward_examples) / self.batch_size

    def add(self, other: "Compute") -> "Compute":
        if other.hvps and self.hvps and other.hvp_examples != self.hvp_examples:
            raise ValueError("cannot add HVP counts on different numbers of examples")
        return Compute(self.batch_size, self.steps + other.steps, self.hvps + other.hvps,
                       self.hvp_examples or other.hvp_examples, self.wall_s + other.wall_s,
                       self.forward_examples + other.forward_examples)

    def to_dict(self) -> dict:
        return {**asdict(self), "step_equivalents": self.step_equivalents}


class ShortLoop:
    """A few training steps of ``config``'s workload as the Trainer would take them.

    ``step(t, lr)`` takes update t (1-based) on the Trainer's batch of step t at rate ``lr`` (all
    param groups) and returns the batch's mean loss *before* the update (float). Model, optimizer,
    data and initial weights are built as in :class:`~trajscope.train.Trainer` (``torch.manual_seed
    (seed)`` then ``make_model``), so step t here is step t of a run of ``config`` at that rate.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, config: RunConfig):
        from trajscope.train.optim import make_optimizer
        from trajscope.train.trainer import BatchSampler

        self.model, self.loss_fn, self.x, self.y, self.config = model, loss_fn, x, y, config
        self.optimizer = make_optimizer(model, config)
        self.sampler = BatchSampler(len(x), config.batch_size, config.seed)
        self.compute = Compute(batch_size=self.sampler.batch_size)
        self.model.train()

    @classmethod
    def for_config(cls, config: RunConfig) -> "ShortLoop":
        from trajscope import workloads

        wl = workloads.get(config.workload)
        data = wl.make_data(config.seed, config.workload_options)
        torch.manual_seed(config.seed)
        model = wl.make_model(config.workload_options)
        loop = cls(model, wl.loss_fn, data.x_train, data.y_train, config)
        loop.data = data
        return loop

    @classmethod
    def for_model(cls, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, config: RunConfig) -> "ShortLoop":
        """On a deep copy of ``model`` (the caller's model is never changed)."""
        return cls(copy.deepcopy(model), loss_fn, x, y, config)

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        idx = self.sampler.indices(t)
        return self.x[idx], self.y[idx]

    def fixed_batch(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``n`` training examples (the same set for every measurement)."""
        return self.x[:n], self.y[:n]

    def step(self, t: int, lr: float) -> float:
        t0 = time.perf_counter()
        x, y = self.batch(t)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.compute.steps += 1
        self.compute.wall_s += time.perf_counter() - t0
        return float(loss.detach())
