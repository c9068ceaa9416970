"""Record a PyTorch Lightning run: ``trainer = lightning.Trainer(callbacks=[TrajscopeCallback("runs")])``.

Where each thing is read (Lightning 2.x hooks):

- gradients in ``on_before_optimizer_step``: once per optimizer step, after the micro-batches of
  gradient accumulation are summed and after AMP unscaling, before gradient clipping (a copy is
  kept, so the recorded ``grad_norm`` and gradient snapshots are those the update started from);
- parameters, and the step's record, in ``on_train_batch_end`` of the batch whose optimizer step
  advanced ``trainer.global_step``: theta_step, once per optimizer step;
- ``loss``: the sum over the accumulation cycle of the ``loss`` that ``training_step`` returned,
  which Lightning has divided by ``accumulate_grad_batches`` (so, with equal micro-batches, the mean
  loss of the effective batch, as a plain loop on that batch records it);
- validation: every ``val*`` entry of ``trainer.callback_metrics`` after each validation (not the
  sanity check), stored under its name at the current step.

The callback's state (step, run id, probe and controller states) goes into Lightning's checkpoints;
``trainer.fit(ckpt_path=...)`` reopens the run, forgets what it recorded after the checkpoint's step
and continues. One optimizer (the first one's learning rates are recorded).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from trajscope.errors import UsageError
from trajscope.integrations.session import Session, jsonable

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the optional extra is missing
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise UsageError("the Lightning integration needs the optional extra 'lightning' "
                         "(pip install 'trajscope[lightning]')") from None


class TrajscopeCallback(pl.Callback):
    """Record the LightningModule's training into a trajscope run.

    Args:
        run: a writable :class:`~trajscope.store.Run`, or a store root in which the run is created
            with ``config`` (default: the module's ``hparams`` and what is recorded) and resumed
            when Lightning resumes.
        probes, controllers: :class:`~trajscope.events.Callback` instances, ``CallbackSpec``\\ s or
            ``"KIND:key=value"`` strings (as ``trajscope run --probe``).
        record: a :class:`~trajscope.config.RecordConfig`, a preset name or a mapping of its fields.
        module: the attribute path of the submodule to record (e.g. ``"model"``; its parameter names
            then match the plain model's); default the whole LightningModule.
        workload: a workload (or name) whose loss function probes use; ``data`` their example set.
        seed, name, overwrite: for a run created under a root (see :meth:`Run.create`).
    """

    def __init__(self, run: Any = "runs", probes: Iterable[Any] = (), controllers: Iterable[Any] = (), *,
                 record=None, module: str | None = None, workload=None, data=None, config=None, seed: int = 0,
                 name: str | None = None, overwrite: bool = False):
        super().__init__()
        self.session = Session(run, record=record, probes=probes, controllers=controllers, workload=workload,
                               data=data, config=config, seed=seed, name=name, overwrite=overwrite)
        self.module = module
        self._last_global = 0
        self._loss: torch.Tensor | None = None
        self._micro: list[Any] = []

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module) -> None:
        # Here (not on_fit_start) the weights, the optimizer and global_step are all restored.
        model = pl_module.get_submodule(self.module) if self.module else pl_module
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._last_global = int(trainer.global_step)
        self.session.open(model, optimizer, start_step=self._last_global, config=self._default_config(pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.session.begin_step()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.session.before_update(stash=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.session.active:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            loss = loss.detach()
            self._loss = loss.clone() if self._loss is None else self._loss + loss
        if self.session.callbacks:  # probes see the whole effective batch
            self._micro.append(batch)
        if int(trainer.global_step) == self._last_global:
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        self._last_global = int(trainer.global_step)
        ok = self.session.after_update(self._loss, _concat(self._micro))
        self._loss, self._micro = None, []
        if not ok:
            trainer.should_stop = True
            pl.utilities.rank_zero_warn(f"trajscope: the run diverged at step {self.session.rec.current_step}; "
                                        "training stops")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.session.evaluated({k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")})

    def on_train_end(self, trainer, pl_module) -> None:
        self.session.close("finished")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        reason = "interrupted" if isinstance(exception, KeyboardInterrupt) else f"{type(exception).__name__}: {exception}"
        self.session.close("crashed", reason=reason)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict)

    def _default_config(self, pl_module) -> dict[str, Any]:
        s = self.session
        return {"integration": "lightning", "module": type(pl_module).__name__, "submodule": self.module,
                "hparams": jsonable(dict(getattr(pl_module, "hparams", {}) or {})),
                "record": s.record.model_dump(mode="json"),
                "callbacks": [getattr(cb, "name", type(cb).__name__) for cb in s.callbacks]}


def _concat(batches: list[Any]):
    """The micro-batches of one step as one (inputs, labels) batch, or None if they are not pairs."""
    if not batches or not all(isinstance(b, (tuple, list)) and len(b) == 2 and all(torch.is_tensor(t) for t in b)
                              for b in batches):
        return None
    if len(batches) == 1:
        return tuple(batches[0])
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


__all__ = ["TrajscopeCallback"]
