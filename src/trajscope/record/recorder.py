"""The Recorder: what to capture at which step, in any training loop.

Three added lines record a plain loop::

    run = trajscope.Run.create("runs", config={"lr": 0.1}, seed=0)
    with trajscope.Recorder(model, run) as rec:           # records step 0 (the init)
        for x, y in batches:
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); opt.step()
            rec.step(loss=loss, optimizer=opt)             # after each optimizer step

Scalars per step (names as stored): ``loss``; ``lr`` (param group 0) and ``lr/<i>`` for groups
i >= 1; ``grad_norm`` (L2 norm over all parameters' ``.grad``, as present when ``step`` is called);
``update_norm`` (L2 norm of theta_t - theta_{t-1} over all parameters); ``param_norm`` (L2 norm
of theta_t over all parameters). Norms are over every parameter of the model, in float32.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from trajscope import schedules as S
from trajscope.errors import DivergedError
from trajscope.record import checkpoint as ckpt
from trajscope.store import Run

ParamFilter = Callable[[str], bool]


def name_filter(params: str | Iterable[str] | ParamFilter | None) -> ParamFilter:
    """None: all; a glob or list of globs (``"conv*.weight"``); or any ``name -> bool`` callable."""
    if params is None:
        return lambda name: True
    if callable(params):
        return params
    patterns = [params] if isinstance(params, str) else list(params)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _group_norms(groups: list[list[torch.Tensor]]) -> list[float]:
    """The L2 norm of each list of tensors (as one concatenated vector), in float32.

    One fused ``_foreach_norm`` over all tensors and one host sync for all groups: on small models
    the per-call overhead, not the arithmetic, is the cost.
    """
    flat = [t for g in groups for t in g]
    if not flat:
        return [0.0] * len(groups)
    per_tensor = torch.stack(torch._foreach_norm(flat)).float()
    out, i = [], 0
    for g in groups:
        out.append(torch.linalg.vector_norm(per_tensor[i:i + len(g)]))
        i += len(g)
    return torch.stack(out).tolist()


class Recorder:
    """Records a model's training into a :class:`Run`, each kind of data on its own schedule.

    Args:
        model: the module whose parameters are recorded (names from ``named_parameters``).
        run: a writable :class:`Run` (from ``Run.create``).
        scalars: schedule of the per-step scalars (default every step).
        snapshots: schedule of parameter snapshots (default: every step to 100, then 20 per decade).
        params: which parameters snapshots (and gradient snapshots) hold; see :func:`name_filter`.
        grads, optimizer_state, buffers: schedules for gradient, optimizer-state and buffer
            snapshots (default never).
        checkpoints: schedule of full checkpoints (model + optimizer + RNG), for resume and rewinding.
        sketch: schedule of the parameter-vector sketch (default every step); ``sketch_dim`` its k
            (0 turns it off), ``sketch_seed`` its random seed.
        commit_every_s: commit the database at most this often (seconds; 0 = every step). Snapshots,
            checkpoints and status changes always commit at once.
        start_step: the step of the model's current state (0 for a new run; the checkpoint step on
            resume). The state at ``start_step`` is recorded at construction if ``record_start``.
    """

    def __init__(self, model: nn.Module, run: Run, *, scalars=S.every(1), snapshots=S.dense_early(),
                 params=None, grads=None, optimizer_state=None, buffers=None, checkpoints=None,
                 sketch=S.every(1), sketch_dim: int = 1024, sketch_seed: int = 0,
                 commit_every_s: float = 1.0, start_step: int = 0, record_start: bool = True):
        self.model = model
        self.run = run
        self.scalars = S.as_schedule(scalars)
        self.snapshots = S.as_schedule(snapshots)
        self.grads = S.as_schedule(grads)
        self.optimizer_state = S.as_schedule(optimizer_state)
        self.buffers = S.as_schedule(buffers)
        self.checkpoints = S.as_schedule(checkpoints)
        self.sketch_schedule = S.as_schedule(sketch) if sketch_dim > 0 else S.never()
        self.commit_every_s = commit_every_s
        self._keep = name_filter(params)
        self._named = [(n, p) for n, p in model.named_parameters()]
        self._params = [p for _, p in self._named]
        self._sketcher = None
        if sketch_dim > 0:
            from trajscope.functional.sketch import Sketcher

            self._sketcher = Sketcher(k=sketch_dim, seed=sketch_seed)
        self._detached = [p.detach() for p in self._params]  # share storage: see in-place updates
        self._prev = [p.clone() for p in self._detached]
        self._step = start_step
        self.closed = False
        if record_start:
            self._record(start_step, loss=None, optimizer=None, extra={}, first=True)
            run.commit()

    @property
    def current_step(self) -> int:
        """The step of the last recorded state."""
        return self._step

    # ------------------------------------------------------------------ public
    def step(self, loss: torch.Tensor | float | None = None, optimizer: torch.optim.Optimizer | None = None,
             checkpoint_extra: dict[str, Any] | None = None, **extra: float) -> int:
        """Record the state after one more optimizer step; return its step number.

        ``extra`` scalars (e.g. ``accuracy=0.9``) are stored under their keyword names. A NaN or
        infinite loss or parameter norm marks the run ``diverged`` at this step, closes it and
        raises :class:`DivergedError`.
        """
        if self.closed:
            raise RuntimeError("Recorder.step called after close")
        self._step += 1
        loss_value = None if loss is None else float(loss.detach() if torch.is_tensor(loss) else loss)
        if loss_value is not None and not math.isfinite(loss_value):
            self._diverge(self._step, f"loss is {loss_value}", {"loss": loss_value})
        self._record(self._step, loss_value, optimizer, extra, checkpoint_extra=checkpoint_extra)
        self.run.maybe_commit(self.commit_every_s)
        return self._step

    def log(self, step: int | None = None, **values: float) -> None:
        """Record extra scalars (e.g. validation metrics) at ``step`` (default: the current step)."""
        self.run.log_scalars(self._step if step is None else step, values)
        self.run.maybe_commit(self.commit_every_s)

    def save_checkpoint(self, optimizer=None, extra: dict[str, Any] | None = None, step: int | None = None) -> None:
        step = self._step if step is None else step
        self.run.save_state(step, ckpt.capture(self.model, optimizer, extra), kind="checkpoint")

    def close(self, status: str = "finished") -> None:
        """Commit everything and close the run with ``status`` (unless it already diverged)."""
        if self.closed:
            return
        self.closed = True
        if self.run.writable:
            self.run.close(status if self.run.status == "running" else None, step=self._step)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("crashed" if exc is not None and not isinstance(exc, DivergedError) else "finished")

    # ------------------------------------------------------------------ internals
    def _diverge(self, step: int, reason: str, values: dict[str, float]) -> None:
        self.run.log_scalars(step, {k: v for k, v in values.items()})
        self.run.close("diverged", step=step, reason=reason)
        self.closed = True
        raise DivergedError(f"run {self.run.id} diverged at step {step}: {reason}", step)

    def _record(self, step: int, loss: float | None, optimizer, extra: dict, first: bool = False,
                checkpoint_extra: dict | None = None) -> None:
        run = self.run
        with torch.no_grad():
            if self.scalars(step):
                values: dict[str, float] = {}
                if loss is not None:
                    values["loss"] = loss
                if optimizer is not None:
                    for i, group in enumerate(optimizer.param_groups):
                        values["lr" if i == 0 else f"lr/{i}"] = float(group["lr"])
                grads = [p.grad for p in self._params if p.grad is not None]
                if not first:  # theta_{t-1} - theta_t, in place (the buffer is refilled below)
                    torch._foreach_sub_(self._prev, self._detached)
                norms = _group_norms([self._detached, grads, [] if first else self._prev])
                values["param_norm"] = norms[0]
                if grads:
                    values["grad_norm"] = norms[1]
                if not first:
                    values["update_norm"] = norms[2]
                values.update({k: float(v) for k, v in extra.items()})
                if not math.isfinite(values["param_norm"]):
                    self._diverge(step, "parameters are not finite", values)
                run.log_scalars(step, values)
            torch._foreach_copy_(self._prev, self._detached)
            if self._sketcher is not None and self.sketch_schedule(step):
                s = self._sketcher.sketch(self._named)
                run.log_sketch(step, s, k=self._sketcher.k, seed=self._sketcher.seed)
            if self.snapshots(step):
                run.save_snapshot(step, {n: p for n, p in self._named if self._keep(n)}, kind="params",
                                  background=True)
            if self.grads(step) and any(p.grad is not None for p in self._params):
                run.save_snapshot(step, {n: p.grad for n, p in self._named if self._keep(n) and p.grad is not None},
                                  kind="grads", background=True)
            if self.buffers(step):
                bufs = dict(self.model.named_buffers())
                if bufs:
                    run.save_snapshot(step, bufs, kind="buffers", background=True)
            if optimizer is not None and self.optimizer_state(step):
                run.save_state(step, optimizer.state_dict(), kind="optim")
            if self.checkpoints(step) and (optimizer is not None or first):
                self.save_checkpoint(optimizer, checkpoint_extra, step=step)
