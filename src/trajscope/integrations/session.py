"""One run recorded from another framework's training loop: the part the Lightning and Hugging Face
callbacks share.

A framework adapter translates its hooks into the calls below, once per *optimizer* step (never per
micro-batch), in this order::

    session.open(model, optimizer, start_step)   # the model holds theta_start; records step 0 if new
    session.begin_step()                         # an optimizer step starts (STEP_START)
    session.before_update(stash=...)             # gradients are complete (AFTER_BACKWARD,
                                                 #   BEFORE_OPTIMIZER_STEP: a controller may set the lr)
    session.after_update(loss, batch)            # parameters hold theta_step: the recorder writes step
                                                 #   (AFTER_OPTIMIZER_STEP, then STEP_END)
    session.evaluated({"val_loss": ...})         # EVAL_START, EVAL_END; stored as scalars
    session.close("finished")                    # FIT_END; the run is closed

The recorder, probes and controllers are the ones the reference :class:`~trajscope.train.Trainer`
uses, so a run recorded here has the same scalars, sketches and snapshots as a plain loop's. The
forward and backward events are not emitted: a framework runs them per micro-batch.

Under torch.distributed (DDP) every rank builds the recorder and takes part in its collectives;
rank 0 alone opens the run and runs the probes (controllers are refused: acting on one rank would
set the replicas apart).
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from trajscope.config import CallbackSpec, RecordConfig
from trajscope.errors import DivergedError, UsageError
from trajscope.events import Callback, Event, StepContext
from trajscope.record import Recorder
from trajscope.store import Run


def as_record_config(record: RecordConfig | str | Mapping[str, Any] | None) -> RecordConfig:
    """None: the default preset; a preset name; a mapping of :class:`RecordConfig` fields; or one."""
    if record is None:
        return RecordConfig()
    if isinstance(record, RecordConfig):
        return record
    if isinstance(record, str):
        return RecordConfig.preset(record)
    from trajscope.config import validated

    return validated(RecordConfig, dict(record))


def build_callbacks(probes: Iterable[Any] = (), controllers: Iterable[Any] = ()) -> list[Callback]:
    """Probes, then controllers: each a ready :class:`Callback`, a :class:`CallbackSpec`, a spec
    mapping or a ``"KIND:key=value,..."`` string (built from the registries as a run config's are)."""
    from trajscope.train.trainer import build_callbacks as from_specs

    def split(items):
        ready, specs = [], []
        for item in items:
            if isinstance(item, Callback):
                ready.append(item)
            elif isinstance(item, CallbackSpec):
                specs.append(item)
            elif isinstance(item, str):
                specs.append(CallbackSpec.parse(item))
            elif isinstance(item, Mapping):
                specs.append(CallbackSpec(**item))
            else:
                raise UsageError(f"a probe or controller must be a Callback, a spec or 'KIND:k=v', got {item!r}")
        return ready, specs

    ready_p, specs_p = split(probes)
    ready_c, specs_c = split(controllers)
    built = from_specs(SimpleNamespace(probes=tuple(specs_p), controllers=tuple(specs_c)))
    n_p = len(specs_p)
    return ready_p + built[:n_p] + ready_c + built[n_p:]


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (anything else becomes its string), for a run's config."""
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


class Session:
    """The recorder, probes and controllers of one run driven by another framework's loop.

    ``run``: a writable :class:`Run`, or a store root (a path) in which :meth:`open` creates the run
    of ``config`` (resumed when the framework resumes; ``overwrite`` deletes a finished one first).
    ``record``: see :func:`as_record_config`. ``probes``/``controllers``: see :func:`build_callbacks`.
    ``workload`` (a name or :class:`~trajscope.workloads.Workload`) gives probes their loss function;
    ``data`` their fixed example set.
    """

    def __init__(self, run: Run | str | os.PathLike, *, record=None, probes: Iterable[Any] = (),
                 controllers: Iterable[Any] = (), workload=None, data=None, config: Mapping | None = None,
                 seed: int = 0, name: str | None = None, overwrite: bool = False):
        if not isinstance(run, (Run, str, os.PathLike)):
            raise UsageError(f"run must be a trajscope Run or a store root path, got {type(run).__name__}")
        if isinstance(run, Run) and not run.writable:
            raise UsageError(f"run {run.id} is open read-only; pass Run.create(...) or a store root")
        if isinstance(workload, str):
            from trajscope import workloads

            workload = workloads.get(workload)
        self._run_arg, self.config, self.seed, self.name, self.overwrite = run, config, seed, name, overwrite
        self.record = as_record_config(record)
        self.callbacks = build_callbacks(probes, controllers)
        self._active = self.callbacks  # those run on this rank (all of them but under distributed)
        self.writer = True  # rank 0 (or no torch.distributed): this process writes the run
        self.workload, self.data = workload, data
        self.run: Run | None = None
        self.rec: Recorder | None = None
        self.ctx: StepContext | None = None
        self._params: list[nn.Parameter] = []
        self._stash: list[torch.Tensor | None] | None = None
        self._in_step = False
        self._loaded: dict[str, Any] | None = None
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ lifecycle
    @property
    def active(self) -> bool:
        """True between :meth:`open` and the end of the run (closed, diverged or crashed)."""
        return self.rec is not None and not self.rec.closed

    def open(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, start_step: int = 0,
             config: Mapping | None = None) -> None:
        """Start recording ``model`` whose parameters hold theta_``start_step`` (0: a new run, whose
        initial state is recorded now; > 0: a resumed run, whose records after that step are
        dropped). ``config`` is the run's config where the constructor was given none."""
        self._t0 = time.perf_counter()
        self.writer = _rank() == 0
        if self.writer:
            self.run = self._open_run(start_step, config)
            if start_step > 0:
                self.run.truncate_after(start_step)
                self.run.log_event(start_step, "resumed", f"resumed from the framework checkpoint of step {start_step}")
        else:  # under torch.distributed rank 0 writes; the others take part in the recorder's collectives
            from trajscope.controllers.base import Controller

            if any(isinstance(cb, Controller) for cb in self.callbacks):
                raise UsageError("controllers act on rank 0 only and would set the ranks apart; they are not "
                                 "supported in a distributed Lightning or Hugging Face run")
            self._active = []  # probes measure and write on rank 0
        self._params = [p for _, p in model.named_parameters()]
        from trajscope.train.trainer import recorder_for

        self.rec = recorder_for(model, self.run, self.record, start_step)
        self.ctx = StepContext(self.run.config if self.run is not None else {}, self.run, model, optimizer,
                               self.workload, self.data, step=start_step)
        self.restore_callbacks((self._loaded or {}).get("callbacks") or {})
        self._emit(Event.INIT)
        self._emit(Event.FIT_START)

    def _open_run(self, start_step: int, config: Mapping | None) -> Run:
        if isinstance(self._run_arg, Run):
            return self._run_arg
        cfg = jsonable(dict(self.config if self.config is not None else (config or {})))
        return Run.create(self._run_arg, cfg, seed=self.seed, name=self.name, exist_ok=start_step > 0,
                          overwrite=self.overwrite and start_step == 0)

    def begin_step(self) -> None:
        """An optimizer step starts: its number is the last recorded step + 1."""
        if not self.active or self._in_step:
            return
        self._in_step = True
        self.ctx.step = self.rec.current_step + 1
        self.ctx.values = {}
        self.ctx.batch = None
        self._emit(Event.STEP_START)

    def before_update(self, stash: bool = True) -> None:
        """The gradients of this optimizer step are complete (after unscaling and accumulation).

        ``stash``: keep a copy of them for :meth:`after_update` (one O(P) copy), for frameworks that
        change them before the update (gradient clipping) or free them after it.
        """
        if not self.active:
            return
        self.begin_step()
        if stash:
            self._stash = [None if p.grad is None else p.grad.detach().clone() for p in self._params]
        self._emit(Event.AFTER_BACKWARD)
        self._emit(Event.BEFORE_OPTIMIZER_STEP)

    def after_update(self, loss: torch.Tensor | float | None, batch=None) -> bool:
        """The parameters hold theta_step: record the step. Returns False if the run diverged (it
        is then closed with status ``diverged`` and every later call is a no-op)."""
        if not self.active:
            return False
        self.begin_step()
        self.ctx.batch = batch
        self.ctx.loss = loss if torch.is_tensor(loss) else None
        saved = [p.grad for p in self._params]
        try:
            if self._stash is not None:  # the gradients as they were when they were complete
                for p, g in zip(self._params, self._stash):
                    p.grad = g
            self._emit(Event.AFTER_OPTIMIZER_STEP)
            self.rec.step(loss=loss, optimizer=self.ctx.optimizer)
        except DivergedError:
            return False
        finally:
            for p, g in zip(self._params, saved):
                p.grad = g
            self._stash = None
            self._in_step = False
        self._emit(Event.STEP_END)
        return True

    def evaluated(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Store evaluation ``metrics`` (finite numbers only) at ``step`` (default: the last step)."""
        if not self.active:
            return
        values = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        self._emit(Event.EVAL_START)
        self.ctx.metrics = values
        self.rec.log(step, **values)
        self._emit(Event.EVAL_END)

    def close(self, status: str = "finished", reason: str | None = None) -> None:
        """End the run: FIT_END (when finished), final metrics into its metadata, then its status."""
        if not self.active:
            return
        if status == "finished":
            self._emit(Event.FIT_END)
            if self.run is not None:
                self.run.set_meta(final=dict(self.ctx.metrics), wall_s=time.perf_counter() - self._t0)
        if reason is not None and self.run is not None and self.run.writable:
            self.rec.closed = True
            self.run.close(status, step=self.rec.current_step, reason=reason)
        else:
            self.rec.close(status)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The step, the run id and every probe's and controller's state (for framework checkpoints)."""
        return {"step": self.rec.current_step if self.rec is not None else 0,
                "run_id": self.run.id if self.run is not None else None,
                "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks
                              if hasattr(cb, "state_dict") and hasattr(cb, "name")}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Keep ``state`` to apply at :meth:`open` (frameworks restore callbacks before training)."""
        self._loaded = dict(state)

    def restore_callbacks(self, states: Mapping[str, Any]) -> None:
        """Give each probe and controller its state from ``states`` (keyed by name), where present."""
        for cb in self.callbacks:
            if getattr(cb, "name", None) in states and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(states[cb.name])

    def _emit(self, event: Event) -> None:
        for cb in self._active:
            cb.on_event(event, self.ctx)


def _rank() -> int:
    """This process's rank under torch.distributed (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _is_number(v: Any) -> bool:
    if torch.is_tensor(v):
        return v.numel() == 1
    return isinstance(v, (int, float)) and not isinstance(v, bool)
