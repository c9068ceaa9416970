"""The reference Trainer: runs a workload and emits the events of :mod:`trajscope.events`.

It is a thin wiring of parts that each own their state: the workload (data, model, loss), the
optimizer and schedule factory, the :class:`~trajscope.record.Recorder`, and the callbacks. The
batch of step t is a pure function of (seed, t), and the learning rate of step t a pure function of
the config, so a run resumed from a checkpoint continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from trajscope import schedules as S
from trajscope import workloads
from trajscope.config import RecordConfig, RunConfig
from trajscope.errors import DivergedError, TrajscopeError, UsageError, unknown_choice
from trajscope.events import Callback, Event, StepContext
from trajscope.record import Recorder, restore
from trajscope.store import Run
from trajscope.train.optim import make_optimizer, schedule_factor


def snapshot_schedule(rec: RecordConfig) -> S.Schedule:
    if rec.snapshots == "dense-early":
        return S.dense_early(rec.snapshot_dense, rec.snapshot_per_decade)
    if rec.snapshots == "log":
        return S.logspace(rec.snapshot_per_decade)
    if rec.snapshots == "every":
        return S.every(rec.snapshot_every)
    return S.never()


def checkpoint_schedule(rec: RecordConfig, steps: int) -> S.Schedule:
    every = rec.checkpoint_every if rec.checkpoint_every is not None else max(steps // 10, 1)
    if every == 0:
        return S.never()
    return (S.every(every) & ~S.at([0])) | S.at([steps])


def recorder_for(model: nn.Module, run: Run, rec: RecordConfig, start_step: int = 0) -> Recorder:
    """The :class:`Recorder` that ``rec`` describes, without checkpoints of its own (the Trainer, or
    the framework of an integration, writes those once every callback has finished the step); it
    records the state at ``start_step`` only for a new run (``start_step`` 0)."""
    snaps = snapshot_schedule(rec)
    return Recorder(model, run, scalars=S.every(rec.scalars_every), snapshots=snaps,
                    params=list(rec.params) if rec.params else None, grads=snaps if rec.grads else None,
                    optimizer_state=snaps if rec.optimizer_state else None, buffers=snaps if rec.buffers else None,
                    checkpoints=None, sketch_dim=rec.sketch_dim, sketch_seed=rec.sketch_seed,
                    start_step=start_step, record_start=start_step == 0)


def run_path(config: RunConfig, root: str | os.PathLike | None = None):
    """The directory of the run that ``config`` names under ``root`` (default ./runs), whether or not
    it exists yet."""
    from trajscope.store import run_id_for
    from trajscope.store.paths import default_root, run_dir

    return run_dir(root if root is not None else default_root(), run_id_for(config.model_dump(mode="json"), config.seed))


def build_callbacks(config: RunConfig) -> list[Callback]:
    """The probes, then the controllers, that ``config`` names (see :class:`CallbackSpec`); an
    unknown kind or a bad option is a one-line UsageError."""
    from trajscope import controllers, probes

    out: list[Callback] = []
    for what, specs, registry in (("probe", config.probes, probes.REGISTRY),
                                  ("controller", config.controllers, controllers.REGISTRY)):
        for spec in specs:
            if spec.kind not in registry:
                raise unknown_choice(what, spec.kind, registry)
            kwargs = dict(spec.options)
            if spec.every is not None:
                kwargs["every"] = spec.every
            try:
                out.append(registry[spec.kind](name=spec.name, **kwargs))
            except (TypeError, ValueError) as e:  # an unknown option, or a bad value of one
                raise UsageError(f"{what} {spec.kind!r}: {e}") from None
    names = [getattr(cb, "name", None) for cb in out]
    dupes = sorted({n for n in names if n is not None and names.count(n) > 1})
    if dupes:
        raise UsageError(f"two probes or controllers are named {dupes[0]!r}; give each its own name")
    return out


def _callback_states(callbacks: Iterable[Callback]) -> dict[str, Any]:
    return {cb.name: cb.state_dict() for cb in callbacks if hasattr(cb, "state_dict") and hasattr(cb, "name")}


class BatchSampler:
    """Batch of step t (1-based): shuffled epochs without replacement, each epoch's permutation
    drawn from a generator seeded by (seed, epoch); the last incomplete batch of an epoch is dropped
    (unless the set is smaller than one batch, then the batch is the whole set)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.per_epoch = max(n // self.batch_size, 1)
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> Tensor:
        epoch, i = divmod(step - 1, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled or None,
                dynamic_ncols=True, leave=False)


class Trainer:
    """Train ``config`` into a run under ``root``.

    ``resume``: continue an existing run of the same config from its last checkpoint;
    ``overwrite``: delete an existing run first. Otherwise an existing *finished* run is returned as
    it is (the store caches by config), and any other existing run raises RunExistsError.
    """

    def __init__(self, config: RunConfig, root: str | os.PathLike | None = None, name: str | None = None,
                 callbacks: Iterable[Callback] = (), progress: bool = True, resume: bool = False,
                 overwrite: bool = False):
        self.config = config
        self.root = root
        self.name = name
        self.callbacks = list(callbacks)
        self._active: list[Callback] = list(self.callbacks)
        self.progress = progress
        self.resume = resume
        self.overwrite = overwrite
        self.workload = workloads.get(config.workload)

    def _emit(self, event: Event, ctx: StepContext) -> None:
        for cb in self._active:
            cb.on_event(event, ctx)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: workloads.Data, chunk: int = 4096,
                 optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Validation loss (mean over the set) and metric, in eval mode, restoring the mode after.

        An optimizer with ``eval()``/``train()`` modes (schedule-free: evaluation uses the averaged
        weights) is put in eval mode for the evaluation and back in train mode after."""
        was_training = model.training
        model.eval()
        modal = optimizer is not None and hasattr(optimizer, "eval") and hasattr(optimizer, "train")
        if modal:
            optimizer.eval()
        logits = torch.cat([model(data.x_val[i:i + chunk]) for i in range(0, len(data.x_val), chunk)])
        if modal:
            optimizer.train()
        model.train(was_training)
        return {"val_loss": self.workload.loss_fn(logits, data.y_val).item(),
                "val_metric": self.workload.metric_fn(logits, data.y_val)}

    def fit(self) -> dict[str, Any]:
        """Run the loop; return ``{"run_id", "path", "status", "steps", "final", "wall_s", ...}``.

        A diverged run is closed with status ``diverged`` and reported (no exception).
        """
        cfg, wl = self.config, self.workload
        existing = self._existing()
        if existing is not None:
            return existing
        self._active = build_callbacks(cfg) + self.callbacks  # a bad spec fails before a run exists
        run = Run.create(self.root, cfg, seed=cfg.seed, name=self.name, exist_ok=self.resume,
                         overwrite=self.overwrite)
        t0 = time.perf_counter()
        try:
            return self._fit(run, t0)
        except BaseException as e:
            if run.writable:
                reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
                run.close("crashed", reason=reason)
            raise

    def _existing(self) -> dict[str, Any] | None:
        from trajscope.store.paths import is_run_dir

        path = run_path(self.config, self.root)
        if self.overwrite or self.resume or not is_run_dir(path):
            return None
        run = Run.open(path)
        try:
            if run.status == "finished":
                return summary(run, cached=True)
        finally:
            run.close()
        return None

    def _fit(self, run: Run, t0: float) -> dict[str, Any]:
        cfg, wl, rec_cfg = self.config, self.workload, self.config.record
        data = wl.make_data(cfg.seed, cfg.workload_options)
        torch.manual_seed(cfg.seed)
        model = wl.make_model(cfg.workload_options)
        optimizer = make_optimizer(model, cfg)
        callbacks = self._active
        start = 0
        if self.resume:
            ckpt_steps = run.snapshot_steps("checkpoint")
            ckpt_steps = [s for s in ckpt_steps if s > 0] or ckpt_steps
            if ckpt_steps:
                start = ckpt_steps[-1]
                extra = restore(run.load_state(start, "checkpoint"), model, optimizer)
                for cb in callbacks:
                    state = (extra.get("callbacks") or {}).get(getattr(cb, "name", None))
                    if state is not None:
                        cb.load_state_dict(state)
                run.truncate_after(start)
                run.log_event(start, "resumed", f"resumed from the checkpoint of step {start}")
            else:
                run.truncate_after(-1)
        else:
            torch.manual_seed(cfg.seed)  # the same RNG stream whether or not a checkpoint was read
        sampler = BatchSampler(len(data.x_train), cfg.batch_size, cfg.seed)
        rec = recorder_for(model, run, rec_cfg, start)
        checkpoints = checkpoint_schedule(rec_cfg, cfg.steps)
        ctx = StepContext(cfg, run, model, optimizer, wl, data, step=start)
        self._emit(Event.INIT, ctx)
        model.train()
        self._emit(Event.FIT_START, ctx)
        if start == 0:
            ctx.metrics = self.evaluate(model, data, optimizer=optimizer)
            rec.log(0, **ctx.metrics)
        bar = _progress(cfg.steps, start, f"{cfg.workload} {run.id}", self.progress)
        try:
            for step in range(start + 1, cfg.steps + 1):
                ctx.step = step
                ctx.values = {}
                self._emit(Event.STEP_START, ctx)
                idx = sampler.indices(step)
                x, y = data.x_train[idx], data.y_train[idx]
                ctx.batch = (x, y)
                self._emit(Event.BEFORE_FORWARD, ctx)
                loss = wl.loss_fn(model(x), y)
                ctx.loss = loss
                self._emit(Event.AFTER_FORWARD, ctx)
                self._emit(Event.BEFORE_BACKWARD, ctx)
                loss.backward()
                self._emit(Event.AFTER_BACKWARD, ctx)
                factor = schedule_factor(cfg, step)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * factor
                self._emit(Event.BEFORE_OPTIMIZER_STEP, ctx)
                optimizer.step()
                self._emit(Event.AFTER_OPTIMIZER_STEP, ctx)
                try:
                    rec.step(loss=loss, optimizer=optimizer)
                finally:
                    optimizer.zero_grad(set_to_none=True)
                self._emit(Event.STEP_END, ctx)
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    self._emit(Event.EVAL_START, ctx)
                    ctx.metrics = self.evaluate(model, data, optimizer=optimizer)
                    rec.log(step, **ctx.metrics)
                    self._emit(Event.EVAL_END, ctx)
                    if not math.isfinite(ctx.metrics["val_loss"]):
                        rec._diverge(step, "validation loss is not finite", {})
                stopper = next((cb for cb in callbacks if getattr(cb, "stop_requested", False)), None)
                # After every callback has finished the step, so their state is whole; a stopped run
                # (e.g. a loser of the early race) is checkpointed too, so that resume continues it.
                if checkpoints(step) or stopper is not None:
                    rec.save_checkpoint(optimizer, {"callbacks": _callback_states(callbacks)}, step=step)
                if stopper is not None:
                    bar.close()
                    run.set_meta(wall_s=time.perf_counter() - t0)
                    rec.close("stopped")
                    return summary(Run.open(run.path), stopped_by=getattr(stopper, "name", type(stopper).__name__))
                bar.update(1)
                if step % cfg.eval_every == 0:
                    bar.set_postfix(loss=f"{loss.item():.4g}", val=f"{ctx.metrics['val_metric']:.3f}")
        except DivergedError as e:
            bar.close()
            return summary(Run.open(run.path), diverged_at=e.step, wall_s=time.perf_counter() - t0)
        bar.close()
        self._emit(Event.FIT_END, ctx)
        wall = time.perf_counter() - t0
        final = dict(ctx.metrics)
        run.set_meta(final=final, wall_s=wall, target=wl.target,
                     reached_target=bool(final.get("val_metric", 0.0) >= wl.target))
        rec.close("finished")
        result = Run.open(run.path)
        try:
            return summary(result)
        finally:
            result.close()


def summary(run: Run, **extra: Any) -> dict[str, Any]:
    """The JSON summary of a run that ``trajscope run/show --json`` print."""
    meta = run.meta
    final = meta.get("final")
    if final is None:
        wide = run.scalars(["val_loss", "val_metric"], wide=True)
        final = {k: float(wide[k].dropna().iloc[-1]) for k in wide.columns if wide[k].notna().any()}
    out = {"run_id": run.id, "name": run.name, "path": str(run.path), "status": run.status,
           "steps": run.last_step() or 0, "final": final, "workload": run.config.get("workload"),
           "wall_s": meta.get("wall_s"), "status_step": meta.get("status_step"),
           "status_reason": meta.get("status_reason")}
    out.update(extra)
    return out
