"""The events of a training run.

The reference :class:`~trajscope.train.Trainer` runs this loop and emits each marked event to its
callbacks (the recorder, probes, controllers). A test parses this docstring and checks that the
trainer emits exactly these events in this order::

    # <INIT>                          callbacks built, run directory open
    # <FIT_START>                     model and optimizer ready, step 0 (the initial state)
    for step in range(start + 1, steps + 1):
        # <STEP_START>
        x, y = next(batches)
        # <BEFORE_FORWARD>
        loss = loss_fn(model(x), y)
        # <AFTER_FORWARD>             ctx.loss holds the graph
        # <BEFORE_BACKWARD>
        loss.backward()
        # <AFTER_BACKWARD>            gradients are in p.grad
        # <BEFORE_OPTIMIZER_STEP>     a controller may change the learning rate here
        optimizer.step(); scheduler.step()
        # <AFTER_OPTIMIZER_STEP>      parameters hold theta_step; gradients still present
        optimizer.zero_grad()
        # <STEP_END>                  the recorder writes step `step`
        if step % eval_every == 0 or step == steps:
            # <EVAL_START>
            metrics = evaluate(model)
            # <EVAL_END>              ctx.metrics holds val_loss and val_metric
    # <FIT_END>                       the run is marked finished

A callback receives ``(event, ctx)`` where ``ctx`` is the typed per-step
:class:`~trajscope.train.StepContext`; it never reads hidden global state.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: events.py depends on nothing at run time
    import torch
    from torch import Tensor, nn

    from trajscope.store import Run
    from trajscope.workloads import Data, Workload


class Event(str, enum.Enum):
    INIT = "init"
    FIT_START = "fit_start"
    STEP_START = "step_start"
    BEFORE_FORWARD = "before_forward"
    AFTER_FORWARD = "after_forward"
    BEFORE_BACKWARD = "before_backward"
    AFTER_BACKWARD = "after_backward"
    BEFORE_OPTIMIZER_STEP = "before_optimizer_step"
    AFTER_OPTIMIZER_STEP = "after_optimizer_step"
    STEP_END = "step_end"
    EVAL_START = "eval_start"
    EVAL_END = "eval_end"
    FIT_END = "fit_end"


def documented_loop() -> list[Event]:
    """The events in the order the module docstring lists them (each once)."""
    return [Event[name] for name in re.findall(r"# <([A-Z_]+)>", __doc__ or "")]


@dataclass
class StepContext:
    """What a callback sees at an event: the typed per-step context, never hidden global state.

    ``step`` is the step being made (0 before the first update; after AFTER_OPTIMIZER_STEP the
    parameters are theta_step). ``batch`` is the current (inputs, labels); ``loss`` the current
    mean loss with its graph (between AFTER_FORWARD and BEFORE_OPTIMIZER_STEP); ``metrics`` the
    latest evaluation (``val_loss``, ``val_metric``); ``loss_fn(logits, y)`` the workload's loss.
    ``values`` holds the scalars that probes measured at this step, keyed as in the store
    (``<probe name>/<quantity>``); the trainer clears it at STEP_START, so a controller that runs
    after a probe at the same event reads this step's measurement, never a stale one.
    """

    config: Any
    run: "Run"
    model: "nn.Module"
    optimizer: "torch.optim.Optimizer"
    workload: "Workload | None" = None
    data: "Data | None" = None
    step: int = 0
    batch: "tuple[Tensor, Tensor] | None" = None
    loss: "Tensor | None" = None
    metrics: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)

    def loss_fn(self, logits: "Tensor", y: "Tensor") -> "Tensor":
        if self.workload is None:
            raise ValueError("this context has no workload, so no loss function")
        return self.workload.loss_fn(logits, y)


def missing_needs(needs, ctx: StepContext) -> list[str]:
    """The entries of a probe's or controller's ``needs`` (``batch``, ``loss_fn``, ``optimizer``,
    ``data``) that ``ctx`` lacks, sorted; an unknown need counts as missing."""
    have = {"batch": ctx.batch is not None, "loss_fn": ctx.workload is not None,
            "optimizer": ctx.optimizer is not None, "data": ctx.data is not None}
    return sorted(n for n in needs if not have.get(n, False))


class Callback:
    """Receives every event, like a Lightning callback: override ``on_<event>`` methods
    (``on_step_end(ctx)``, ``on_fit_start(ctx)``, ...) or ``on_event(event, ctx)`` itself."""

    def on_event(self, event: Event, ctx: StepContext) -> None:
        handler = getattr(self, f"on_{event.value}", None)
        if handler is not None:
            handler(ctx)
