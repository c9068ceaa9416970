"""Controllers: act on training from what the probes and the trajectory show.

A controller is a :class:`~trajscope.events.Callback` with a named, serializable decision state (a
dataclass, like optax's ``<Name>State``). Every decision goes into the run's event log as an event
of kind ``controller`` whose data holds the controller's ``name``, the ``reason``, the ``evidence``
(the probe values it used) and the ``state`` after the decision, so that a user can see why the
learning rate changed; the report draws them as a timeline.

Subclasses set ``default_name`` (also the registry key) and ``needs`` (as for probes: ``batch``,
``loss_fn``, ``optimizer``, ``data``), keep their state in ``self.state`` (a dataclass instance of
plain JSON values) and call :meth:`Controller.decide` when they act. Tensors a controller must carry
across a checkpoint (a window of sketches, a warm-start vector) go in :meth:`Controller.buffers`: they
are saved with the state in checkpoints (key ``"_buffers"``) but not written to the event log.
Every registered controller is built with no arguments by one conformance test.

Three ways to use a controller:

- in the :class:`~trajscope.train.Trainer`, named in the config (``RunConfig(controllers=
  (CallbackSpec(kind="stability", every=10),))``) or passed as ``Trainer(cfg, callbacks=[ctl])``;
- from the command line: ``trajscope run WORKLOAD --controller stability:every=10``;
- in a plain loop, through :class:`LoopHooks` (it emits the events a controller listens to)::

      hooks = LoopHooks([ctl], model, opt, loss_fn=F.cross_entropy)   # or run=Run.create(...)
      hooks.start()
      for x, y in batches:
          loss = F.cross_entropy(model(x), y); loss.backward()
          hooks.before_optimizer_step((x, y), loss)   # a controller may change the lr here
          opt.step()
          hooks.after_optimizer_step()                # probes measure, controllers decide
          opt.zero_grad()

  Without a run the scalars and decisions go to ``hooks.run`` (a :class:`MemoryRun`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable

from trajscope.errors import UsageError
from trajscope.events import Callback, Event, StepContext, missing_needs

REGISTRY: dict[str, type["Controller"]] = {}

KIND = "controller"  # the event kind of a decision (read by trajscope.report.controllers)


def register(cls: type["Controller"]) -> type["Controller"]:
    """Class decorator: make ``cls`` buildable from a run config (``controllers=[{"kind": ...}]``)."""
    if cls.default_name in REGISTRY:
        raise ValueError(f"controller name {cls.default_name!r} registered twice")
    REGISTRY[cls.default_name] = cls
    return cls


def all_controllers() -> dict[str, type["Controller"]]:
    return dict(REGISTRY)


class Controller(Callback):
    """Base class of controllers (see the module docstring). ``every``: the decision interval in
    steps (the subclass says what it does on those steps)."""

    default_name: ClassVar[str] = "controller"
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str | None = None, every: int | None = None):
        if every is not None and int(every) < 1:
            raise UsageError(f"controller {name or self.default_name!r}: every must be >= 1, got {every}")
        self.name = name or self.default_name
        self.every = None if every is None else int(every)
        self.state: Any = None  # a dataclass instance, set by the subclass
        self._checked = False

    def check(self, ctx: StepContext) -> None:
        """Fail with one line naming what the context lacks (checked once, at first use)."""
        if self._checked:
            return
        missing = missing_needs(self.needs, ctx)
        if missing:
            raise UsageError(f"controller {self.name!r} needs {', '.join(missing)} in its context")
        self._checked = True

    def decide(self, ctx: StepContext, message: str, reason: str, evidence: dict[str, Any] | None = None) -> None:
        """Write one decision to the run: ``message`` says what was done, ``reason`` why, and
        ``evidence`` the values it rested on; the current state is stored with it."""
        data = {"controller": self.name, "reason": reason, "evidence": evidence or {}, "state": self.decision_state()}
        ctx.run.log_event(ctx.step, KIND, message, data)

    def log_values(self, ctx: StepContext, values: dict[str, float]) -> None:
        """Write scalars as ``<name>/<quantity>`` to the run and to ``ctx.values`` (like a probe)."""
        named = {f"{self.name}/{k}": float(v) for k, v in values.items()}
        ctx.values.update(named)
        ctx.run.log_scalars(ctx.step, named)

    def decision_state(self) -> dict[str, Any]:
        """The decision state as plain JSON values (what the event log stores)."""
        if self.state is None:
            return {}
        return dataclasses.asdict(self.state) if dataclasses.is_dataclass(self.state) else dict(self.state)

    def buffers(self) -> dict[str, Any]:
        """Tensors (and nested plain values) to carry across a checkpoint; none by default."""
        return {}

    def load_buffers(self, buffers: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """The decision state as plain values plus ``"_buffers"`` where there are any (checkpoints)."""
        out = self.decision_state()
        buffers = self.buffers()
        if buffers:
            out["_buffers"] = buffers
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        buffers = state.pop("_buffers", None)
        if self.state is not None and dataclasses.is_dataclass(self.state) and state:
            self.state = type(self.state)(**state)
        if buffers:
            self.load_buffers(buffers)


class MemoryRun:
    """A stand-in for a :class:`~trajscope.store.Run` in a plain loop without a store: keeps the
    scalars (``scalars[name] -> [(step, value)]``) and events (dicts) in memory."""

    def __init__(self):
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.events: list[dict[str, Any]] = []

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.scalars.setdefault(k, []).append((int(step), float(v)))

    def log_event(self, step: int | None, kind: str, message: str, data: Any = None) -> None:
        self.events.append({"step": step, "kind": kind, "message": message, "data": data})

    def decisions(self, name: str | None = None) -> list[dict[str, Any]]:
        """The controller decisions (of controller ``name``, or all)."""
        return [e for e in self.events if e["kind"] == KIND and (name is None or e["data"]["controller"] == name)]


class _LossOnly:
    """The part of a workload a probe or controller uses in a plain loop: its loss."""

    def __init__(self, loss_fn: Callable):
        self.loss_fn = loss_fn


class LoopHooks:
    """Emit the events of :mod:`trajscope.events` from a plain training loop (module docstring).

    ``callbacks`` (probes first, then controllers) receive the events in the Trainer's order:
    :meth:`start` emits INIT and FIT_START (step 0, or ``start_step``); :meth:`before_optimizer_step`
    advances the step and emits STEP_START .. BEFORE_OPTIMIZER_STEP (after the backward pass, so the
    forward/backward events arrive late, all at once); :meth:`after_optimizer_step` emits
    AFTER_OPTIMIZER_STEP and STEP_END. ``loss_fn(logits, y)`` is the mean loss (needed by curvature
    measurements); ``data`` a :class:`~trajscope.workloads.Data` for probes on a fixed probe set.
    """

    def __init__(self, callbacks: Iterable[Callback], model, optimizer, *, loss_fn: Callable | None = None,
                 data=None, run=None, config: Any = None, start_step: int = 0):
        self.callbacks = list(callbacks)
        self.run = run if run is not None else MemoryRun()
        workload = _LossOnly(loss_fn) if loss_fn is not None else None
        self.ctx = StepContext(config, self.run, model, optimizer, workload, data, step=start_step)

    def _emit(self, *events: Event) -> None:
        for event in events:
            for cb in self.callbacks:
                cb.on_event(event, self.ctx)

    def start(self) -> StepContext:
        self._emit(Event.INIT, Event.FIT_START)
        return self.ctx

    def before_optimizer_step(self, batch=None, loss=None) -> StepContext:
        ctx = self.ctx
        ctx.step += 1
        ctx.values, ctx.batch, ctx.loss = {}, batch, loss
        self._emit(Event.STEP_START, Event.BEFORE_FORWARD, Event.AFTER_FORWARD, Event.BEFORE_BACKWARD,
                   Event.AFTER_BACKWARD, Event.BEFORE_OPTIMIZER_STEP)
        return ctx

    def after_optimizer_step(self) -> StepContext:
        self._emit(Event.AFTER_OPTIMIZER_STEP, Event.STEP_END)
        return self.ctx

    def finish(self) -> None:
        self._emit(Event.FIT_END)
