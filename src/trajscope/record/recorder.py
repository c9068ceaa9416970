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

Under torch.distributed (see ``record/distributed.py``) every rank builds the Recorder and calls
``step``; rank 0 passes the run and the others ``run=None``. Each rank measures its part of the
parameters; the parts' values and the losses (averaged over ranks) are summed in batches of
``reduce_every`` steps, so a divergence stops every rank up to ``2 * reduce_every - 1`` steps
late, and what rank 0 recorded after the diverged step is dropped.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import nn

from trajscope import schedules as S
from trajscope.errors import DivergedError, UsageError
from trajscope.record import checkpoint as ckpt
from trajscope.record import distributed as D
from trajscope.record.plan import Plan
from trajscope.record.state import FlatState, TensorState, _dense, batch_rows
from trajscope.store import Run
from trajscope.store.tensors import safetensors_header

ParamFilter = Callable[[str], bool]


class _Late(Exception):
    """A divergence found while the run was being flushed by someone else (see _hand_over)."""


class _Pending(NamedTuple):
    """What a step left for :meth:`Recorder._process`: the values taken when it was recorded."""

    step: int
    loss: float | None
    lrs: dict | None  # the learning rates at the step; None if scalars are not on the schedule
    extra: dict
    has_grad: bool
    first: bool
    sketch: bool
    snapshot: bool  # a whole-model float32 snapshot, written from the state's row at processing


def name_filter(params: str | Iterable[str] | ParamFilter | None) -> ParamFilter:
    """None: all; a glob or list of globs (``"conv*.weight"``); or any ``name -> bool`` callable."""
    if params is None:
        return lambda name: True
    if callable(params):
        return params
    patterns = [params] if isinstance(params, str) else list(params)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Recorder:
    """Records a model's training into a :class:`Run`, each kind of data on its own schedule.

    Args:
        model: the module whose parameters are recorded (names from ``named_parameters``; a
            ``DistributedDataParallel`` wrapper is looked through, so names match the plain model).
        run: a writable :class:`Run` (from ``Run.create``); ``None`` on ranks other than 0.
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
        flat_max: up to this many (local) parameter elements, the per-step state is kept in flat
            float32 rows (fastest on small models; see ``record/state.py``): a step copies the
            parameters and gradients, and the norms and sketches of up to 16 steps (fewer on
            larger models, ``state.batch_rows``) are computed together, at the latest when the
            database commits, the recorder closes or (DDP) the loss reduction starts; so a
            non-finite parameter vector is noticed up to that many steps late, and what was
            recorded after it is dropped. Above ``flat_max``, per tensor (one copy of the
            parameters), each step at once.
        process_group: the torch.distributed group the model trains in (default: the default group).
        reduce_every: under DDP and FSDP2, the losses, squared norms and sketches of this many
            steps are summed over the ranks in one all_reduce (see ``PendingReduction``).
    """

    def __init__(self, model: nn.Module, run: Run | None, *, scalars=S.every(1), snapshots=S.dense_early(),
                 params=None, grads=None, optimizer_state=None, buffers=None, checkpoints=None,
                 sketch=S.every(1), sketch_dim: int = 1024, sketch_seed: int = 0,
                 commit_every_s: float = 1.0, start_step: int = 0, record_start: bool = True,
                 flat_max: int = 1 << 22, process_group=None, reduce_every: int = 8):
        self.model = D.unwrap(model)
        self.run = run
        self.scalars = S.as_schedule(scalars)
        self.snapshots = S.as_schedule(snapshots)
        self.grads = S.as_schedule(grads)
        self.optimizer_state = S.as_schedule(optimizer_state)
        self.buffers = S.as_schedule(buffers)
        self.checkpoints = S.as_schedule(checkpoints)
        self.sketch_schedule = S.as_schedule(sketch) if sketch_dim > 0 else S.never()
        self._plan = Plan((self.scalars, self.sketch_schedule, self.snapshots, self.grads, self.buffers,
                           self.optimizer_state, self.checkpoints))
        self.commit_every_s = commit_every_s
        self._keep = name_filter(params)
        self._named = [(n, p) for n, p in self.model.named_parameters()]
        self._params = [p for _, p in self._named]
        self.layout = D.detect(self._params, process_group)
        self._check_run_and_layout(run, optimizer_state, checkpoints)
        self._sketcher = None
        if sketch_dim > 0:
            from trajscope.functional.sketch import Sketcher

            self._sketcher = Sketcher(k=sketch_dim, seed=sketch_seed)
        self._reduction = D.PendingReduction(self.layout, reduce_every) if self.layout.mode != "single" else None
        self._snap_head = None  # cached safetensors header of a whole-model float32 snapshot
        self._pieces: list[tuple[int, int, int, bool]] = []  # DDP: this rank's (param, first, end, whole)
        self._pending: list[_Pending] = []  # steps pushed into the state, not yet processed
        self._waiting: list[_Pending] = []  # distributed: steps processed here, not yet reduced
        self._parts: list[torch.Tensor] = []  # distributed: this rank's (n, 4 + k) values of those not sent
        self._late = None  # (step, reason, values) of a divergence found by a flush of the run
        self._in_hook = False
        if run is not None:
            run.flush_hooks.append(self._hand_over)
        self._state = self._make_state(flat_max)  # None on the DDP writer, which measures nothing
        if self._state is not None:
            self._state.prime(self._local()[0])  # theta_{start}: the first update_norm after a resume
        self._step = start_step
        self.closed = False
        if record_start:
            self._record(start_step, loss=None, optimizer=None, extra={}, first=True)
            if self.run is not None:
                self._process()
                self.run.commit()

    def _check_run_and_layout(self, run, optimizer_state, checkpoints) -> None:
        where = f"rank {self.layout.rank} of {self.layout.world}"
        if self.layout.writer and run is None:
            raise UsageError(f"Recorder on {where} needs a run (Run.create(...)); other ranks pass run=None")
        if not self.layout.writer and run is not None:
            raise UsageError(f"Recorder on {where}: only rank 0 writes; pass run=None on this rank")
        if self.layout.mode == "sharded" and (optimizer_state is not None or checkpoints is not None):
            raise UsageError("optimizer-state snapshots and full checkpoints of an FSDP2 model are not "
                             "recorded; save them with torch.distributed.checkpoint")

    def _local(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """This rank's parts of the parameters and of their gradients (the tensors themselves in
        a single process; fetched anew each step so a replaced ``.data`` is seen)."""
        mode = self.layout.mode
        if mode == "single":
            return self._params, [p.grad for p in self._params]
        if mode == "replicated":  # whole tensors, and at most two cut ones (flattened slices)
            ps = self._params
            ts = [ps[j] if whole else ps[j].reshape(-1)[a:b] for j, a, b, whole in self._pieces]
            gs = [ps[j].grad for j, _, _, _ in self._pieces]
            gs = [g if g is None or whole else _dense(g).reshape(-1)[a:b]
                  for g, (_, a, b, whole) in zip(gs, self._pieces)]
            return ts, gs
        ts = [D.local_slice(n, p, self.layout)[0] for n, p in self._named]
        gs = [D.local_slice(n, p.grad, self.layout)[0] for n, p in self._named]
        return ts, gs

    def _make_state(self, flat_max: int):
        mode, flat_ok = self.layout.mode, all(p.is_floating_point() for p in self._params)
        whole = [(n, p.dtype, tuple(p.shape)) for n, p in self._named if self._keep(n)]
        if mode != "sharded" and len(whole) == len(self._named) and flat_ok \
                and all(p.dtype == torch.float32 for p in self._params) \
                and len({p.device for p in self._params}) <= 1 and sum(p.numel() for p in self._params) <= flat_max:
            # single: row 0 of the buffer is the file's data; DDP: a copy on the snapshot's step
            self._snap_head = safetensors_header(whole)
        if mode == "replicated":
            sizes = [p.numel() for p in self._params]
            self._pieces = [(j, a, b, a == 0 and b == sizes[j])
                            for j, a, b in D.measured_part(sizes, self.layout.rank, self.layout.world)]
            if not self._pieces:
                return None
            names = [self._named[j][0] for j, _, _, _ in self._pieces]
            parts = list(zip(self._local()[0], [a for _, a, _, _ in self._pieces]))
        else:
            names = [n for n, _ in self._named]
            parts = [D.local_slice(n, p, self.layout) for n, p in self._named]
        layout = [(n, off, t.numel()) for n, (t, off) in zip(names, parts)]
        devices = {t.device for t, _ in parts}
        device = next(iter(devices)) if devices else torch.device("cpu")
        if len(devices) <= 1 and sum(m for _, _, m in layout) <= flat_max and flat_ok:
            return FlatState([t.shape for t, _ in parts], device, layout, self._sketcher,
                             batch_rows(sum(m for _, _, m in layout)))
        return TensorState([t for t, _ in parts], layout, self._sketcher, device)

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
        raises :class:`DivergedError` (on every rank: the decision is taken after the reduction).
        """
        if self.closed:
            raise RuntimeError("Recorder.step called after close")
        if self._late is not None:
            self._diverge(*self._late)
        self._step += 1
        loss_value = None if loss is None else (loss.item() if torch.is_tensor(loss) else float(loss))
        if loss_value is not None and self.layout.mode == "single" and not math.isfinite(loss_value):
            self._process()  # an earlier step's parameters may have diverged first
            self._diverge(self._step, f"loss is {loss_value}", {"loss": loss_value})
        self._record(self._step, loss_value, optimizer, extra, checkpoint_extra=checkpoint_extra)
        if self._reduction is None and self.run is not None and self.run.commit_due(self.commit_every_s):
            self._process()
            self.run.commit()
        return self._step

    def log(self, step: int | None = None, **values: float) -> None:
        """Record extra scalars (e.g. validation metrics) at ``step`` (default: the current step)."""
        if self.run is None:
            return
        self.run.log_scalars(self._step if step is None else step, values)
        self.run.maybe_commit(self.commit_every_s)

    def save_checkpoint(self, optimizer=None, extra: dict[str, Any] | None = None, step: int | None = None) -> None:
        if self.run is None:
            return
        step = self._step if step is None else step
        self.run.save_state(step, ckpt.capture(self.model, optimizer, extra), kind="checkpoint")

    def close(self, status: str = "finished") -> None:
        """Commit everything and close the run with ``status`` (unless it already diverged)."""
        if self.closed:
            return
        try:
            if self._late is not None:
                self._diverge(*self._late)
            self._process()
            self._settle(flush=True)
        except DivergedError:  # the last step diverged: the run says so, nothing more to close
            return
        self.closed = True
        if self.run is not None and self.run.writable:
            self._unhook()
            self.run.close(status if self.run.status == "running" else None, step=self._step)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("crashed" if exc is not None and not isinstance(exc, DivergedError) else "finished")

    # ------------------------------------------------------------------ internals
    def _diverge(self, step: int, reason: str, values: dict[str, float]) -> None:
        """Mark the run diverged at ``step`` (after recording the steps before it that are still
        pending, which may show an earlier divergence) and raise DivergedError."""
        if self._reduction is not None:  # every rank stops here: the steps after it are dropped
            self._reduction.clear()
        elif self._pending:  # (a prefix of the pushed steps: the state processes them in order)
            self._pending = [r for r in self._pending if r.step <= step]
            self._process()
        self._pending, self._waiting, self._parts, self._late = [], [], [], None
        if self.run is not None:
            self._unhook()
            if step < self._step:  # rank 0 went on recording until it (or every rank) knew
                self.run.truncate_after(step)
            self.run.log_scalars(step, {k: v for k, v in values.items()})
            self.run.close("diverged", step=step, reason=reason)
        self.closed = True
        run_id = self.run.id if self.run is not None else f"(rank {self.layout.rank})"
        raise DivergedError(f"run {run_id} diverged at step {step}: {reason}", step)

    def _settle(self, flush: bool = False) -> None:
        """Finish the reduction in flight (distributed; with ``flush`` also that of the queued
        steps): rank 0 writes the steps' rows, every rank stops at the first step that diverged."""
        if self._reduction is None:
            return
        parts = None
        if flush and self._parts:
            parts = self._parts[0] if len(self._parts) == 1 else torch.cat(self._parts)
            self._parts = []
        steps, losses, sums = self._reduction.finish(flush, parts)
        if not steps:
            return
        rows, self._waiting = self._waiting[:len(steps)], self._waiting[len(steps):]
        sketch = sums[:, 4:] if self._sketcher is not None else None
        self._write(rows, losses, sums[:, 1:4], sketch, (sums[:, 0] > 0).tolist())

    def _start(self) -> None:
        """Start the reduction of the queued steps (all of them processed here first)."""
        self._process()
        parts, self._parts = self._parts, []
        self._reduction.start(parts[0] if len(parts) == 1 else torch.cat(parts))

    def _record(self, step: int, loss: float | None, optimizer, extra: dict, first: bool = False,
                checkpoint_extra: dict | None = None) -> None:
        """Push the step into the state, write its snapshots; the norms, sketch and scalar rows
        follow at :meth:`_process` (at once for :class:`TensorState` and under FSDP2)."""
        run, state = self.run, self._state
        plan = self._plan(step)  # (scalars, sketch, snapshots, grads, buffers, optimizer state, checkpoints)
        lrs = None
        if plan[0] and run is not None:
            lrs = {}
            if optimizer is not None:
                for i, group in enumerate(optimizer.param_groups):
                    lrs["lr" if i == 0 else f"lr/{i}"] = float(group["lr"])
            extra = {k: float(v) for k, v in extra.items()} if extra else extra
        # torch.no_grad() as a context manager cost ~10 us per step right after a training step;
        # these two calls are what it does.
        grad_was = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            has_grad = False
            if state is not None:
                if state.full:
                    self._process()
                if self._reduction is None:
                    ts = self._params
                    gs = [p.grad for p in ts]
                else:
                    ts, gs = self._local()
                has_grad = state.push(ts, gs, first)[1]
            snapshot = plan[2] and self._snap_head is not None and run is not None
            if snapshot and self._reduction is not None:  # DDP: rank 0 holds every parameter
                theta = torch.cat([p.reshape(-1) for p in self._params])
                run.write_snapshot(step, [self._snap_head, theta.numpy()], "params", copy=False)
            self._pending.append(_Pending(step, loss, lrs, extra, has_grad, first,
                                          plan[1] and self._sketcher is not None,
                                          snapshot and self._reduction is None))
            if snapshot:
                plan = plan[:2] + (False,) + plan[3:]
            if True in plan[2:]:
                self._snapshots(step, optimizer, first, checkpoint_extra, plan[2:])
            if state is not None and state.batch == 1:  # TensorState sketches the live tensors
                self._process()
            if self._reduction is not None:
                self._reduction.add(step, loss)
                if self._reduction.due:  # in one step: rank 0 writes a batch, the others measure
                    self._settle()  # the one before (stops every rank at a divergence)
                    self._start()
                    if run is not None and run.commit_due(self.commit_every_s):
                        run.commit()
        finally:
            torch._C._set_grad_enabled(grad_was)

    def _unhook(self) -> None:
        if self._hand_over in self.run.flush_hooks:
            self.run.flush_hooks.remove(self._hand_over)

    def _hand_over(self) -> None:
        """The run is being flushed (a commit, a close, a read) by someone else: record the
        pending steps into it. A divergence found here is raised at the next step or close."""
        if self._pending and not self._in_hook and self.run.writable:
            self._in_hook = True
            try:
                self._process()
            finally:
                self._in_hook = False

    def _stop_at(self, step: int, reason: str, values: dict) -> None:
        """Diverged at ``step``: now, or, inside a flush of the run, at the next step or close."""
        if self._in_hook:
            self._late = (step, reason, values)
            raise _Late()
        self._diverge(step, reason, values)

    def _process(self) -> None:
        try:
            self._process_rows()
        except _Late:
            pass

    def _process_rows(self) -> None:
        """Norms and sketches of the pushed steps, in step order; in a single process also their
        snapshots and scalar rows (see :meth:`_write`). Distributed, this rank's values of them
        wait for the reduction (:meth:`_settle`)."""
        rows, self._pending = self._pending, []
        if not rows:
            return
        width = 4 + (self._sketcher.k if self._sketcher is not None else 0)
        if self._state is None:  # the DDP writer measures nothing: its part is empty
            self._parts.append(torch.zeros(len(rows), width, device=self.layout.device))
            self._waiting.extend(rows)
            return
        sq, sk = self._state.process(any(r.sketch for r in rows))
        if self._reduction is not None:  # [had a gradient, 3 squared norms, sketch] of this part
            cols = [torch.tensor([[float(r.has_grad)] for r in rows], device=sq.device), sq]
            if self._sketcher is not None:
                cols.append(sk if sk is not None else sq.new_zeros(len(rows), self._sketcher.k))
            self._parts.append(torch.cat(cols, dim=1))
            self._waiting.extend(rows)
            return
        snaps = [i for i, r in enumerate(rows) if r.snapshot]
        if snaps:  # the rows' bytes are the files' data: one copy of them all, no copy per file
            for i, theta in zip(snaps, self._state.thetas(snaps).numpy()):
                self.run.write_snapshot(rows[i].step, [self._snap_head, theta], "params", copy=False)
        self._write(rows, [r.loss for r in rows], sq, sk, [r.has_grad for r in rows])

    def _write(self, rows: list[_Pending], losses: list[float | None], sq: torch.Tensor,
               sk: torch.Tensor | None, has_grad: list[bool]) -> None:
        """The scalar rows and sketches of ``rows`` (rank 0), from their losses, (n, 3) squared
        norms and (n, k) sketches (summed over ranks when distributed); a non-finite loss or
        parameter vector marks the run diverged at its step, after writing the steps before."""
        run = self.run
        # float64 square roots of the float32 squares (as math.sqrt of each; NaN stays NaN)
        norms_host = sq.double().sqrt_().tolist()
        sketch_steps, sketch_rows, scalar_rows = [], [], []

        def flush() -> None:  # what the rows before a divergence recorded
            self._log_sketches(sketch_steps, sk, sketch_rows)
            if scalar_rows:
                run.log_scalar_rows(scalar_rows)
                scalar_rows.clear()

        for i, (r, loss, grad, (param_norm, grad_norm, update_norm)) in enumerate(
                zip(rows, losses, has_grad, norms_host)):
            if loss is not None and not math.isfinite(loss):
                flush()
                self._stop_at(r.step, f"loss is {loss}", {"loss": loss})
            if not math.isfinite(param_norm):
                flush()
                self._stop_at(r.step, "parameters are not finite", {"param_norm": param_norm})
            if r.lrs is not None and run is not None:
                # in the order of one dict of the step's values: a later row of a name replaces it
                step = r.step
                if loss is not None:
                    scalar_rows.append((step, "loss", loss))
                scalar_rows.extend([(step, name, v) for name, v in r.lrs.items()])
                scalar_rows.append((step, "param_norm", param_norm))
                if grad:
                    scalar_rows.append((step, "grad_norm", grad_norm))
                if not r.first:
                    scalar_rows.append((step, "update_norm", update_norm))
                if r.extra:
                    scalar_rows.extend([(step, name, v) for name, v in r.extra.items()])
            if r.sketch and sk is not None:
                sketch_steps.append(r.step)
                sketch_rows.append(i)
        flush()

    def _log_sketches(self, steps: list[int], sk, rows: list[int]) -> None:
        if steps and self.run is not None:
            self.run.log_sketches(steps, sk[rows] if len(rows) < sk.shape[0] else sk,
                                  k=self._sketcher.k, seed=self._sketcher.seed)
        steps.clear()
        rows.clear()

    def _snapshots(self, step: int, optimizer, first: bool, checkpoint_extra: dict | None, plan) -> None:
        """Snapshots, optimizer state and checkpoints due at ``step`` (``plan``: whether the
        snapshot, gradient, buffer, optimizer-state and checkpoint schedules fire)."""
        run, sharded = self.run, self.layout.mode == "sharded"
        if run is None and not sharded:
            return
        snapshots, grads, buffers, optimizer_state, checkpoints = plan
        if snapshots:  # (whole-model float32 snapshots of the flat state: at _process_rows)
            self._save(step, "params", {n: p for n, p in self._named if self._keep(n)})
        if grads and any(p.grad is not None for p in self._params):
            self._save(step, "grads", {n: p.grad for n, p in self._named if self._keep(n) and p.grad is not None})
        if buffers and run is not None:
            bufs = dict(self.model.named_buffers())
            if bufs:
                run.save_snapshot(step, bufs, kind="buffers", background=True)
        if run is None:
            return
        if optimizer is not None and optimizer_state:
            run.save_state(step, optimizer.state_dict(), kind="optim")
        if checkpoints and (optimizer is not None or first):
            self.save_checkpoint(optimizer, checkpoint_extra, step=step)

    def _save(self, step: int, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        """Gather full tensors (a collective under FSDP2, on every rank) and write them on rank 0."""
        if self.layout.mode == "sharded":
            tensors = {n: D.full(t) for n, t in tensors.items()}
        if self.run is not None:
            self.run.save_snapshot(step, tensors, kind=kind, background=True)
