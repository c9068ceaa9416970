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
