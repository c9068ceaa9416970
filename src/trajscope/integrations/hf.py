"""Record a Hugging Face ``transformers.Trainer`` run:
``Trainer(..., callbacks=[TrajscopeCallback("runs")])``.

Where each thing is read (the Trainer's callback events):

- gradients in ``on_optimizer_step`` (transformers >= 4.43: right after ``optimizer.step()``,
  before ``zero_grad``): the accumulated gradients the update used, i.e. *after* the Trainer's
  clipping to ``max_grad_norm`` (the Trainer itself logs the norm before clipping);
- parameters in the same event: theta_step, once per optimizer step; the learning rate is the one
  of that update (the scheduler steps after it);
- ``loss``: the ``loss`` the model returns in training mode (a forward hook). With
  ``num_items_in_batch`` (the Trainer passes it to models that accept loss kwargs) each
  micro-batch's loss is already divided by the whole step's token count, so the micro-batch losses
  are summed; otherwise they are averaged. A model without a ``loss`` output (a custom
  ``compute_loss``) records no loss;
- evaluation: ``on_evaluate``'s ``eval_<name>`` metrics, stored as ``val_<name>`` (``val_loss``),
  without the Trainer's timing entries.

Older releases without ``on_optimizer_step`` record at ``on_step_end`` instead, after
``zero_grad``: parameters and loss, but no gradients. At every Trainer checkpoint (``on_save``) the
probe and controller states go into the run; ``trainer.train(resume_from_checkpoint=...)`` reopens
the run, forgets what was recorded after the checkpoint's step, restores them and continues.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from trajscope.errors import UsageError
from trajscope.integrations.session import Session, jsonable

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - the optional extra is missing
    raise UsageError("the Hugging Face integration needs the optional extra 'hf' "
                     "(pip install 'trajscope[hf]')") from None

HAS_OPTIMIZER_EVENTS = hasattr(TrainerCallback, "on_optimizer_step")
STATE_KIND = "hf-callbacks"  # the run's snapshot kind that holds probe/controller states
_TRAINING_ARGS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                  "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
                  "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "optim")
_TIMING = ("runtime", "samples_per_second", "steps_per_second")


class TrajscopeCallback(TrainerCallback):
    """Record a ``transformers.Trainer`` run into trajscope (arguments as for the Lightning
    callback: ``run`` a writable Run or a store root; ``probes``, ``controllers``, ``record``,
    ``workload``, ``data``, ``config``, ``seed``, ``name``, ``overwrite``). The default config of a
    run created under a root is the model's config plus the training arguments that shape the
    trajectory."""

    def __init__(self, run: Any = "runs", probes: Iterable[Any] = (), controllers: Iterable[Any] = (), *,
                 record=None, workload=None, data=None, config=None, seed: int = 0, name: str | None = None,
                 overwrite: bool = False):
        self.session = Session(run, record=record, probes=probes, controllers=controllers, workload=workload,
                               data=data, config=config, seed=seed, name=name, overwrite=overwrite)
        self._losses: list[tuple[torch.Tensor, bool]] = []
        self._hook = None

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise UsageError("the trajscope callback needs the Trainer's model in on_train_begin")
        start = int(state.global_step)
        self.session.open(model, optimizer, start_step=start, config=self._default_config(args, model))
        run = self.session.run
        if run is not None and start > 0 and start in run.snapshot_steps(STATE_KIND):
            self.session.restore_callbacks(run.load_state(start, STATE_KIND).get("callbacks") or {})
        self._hook = model.register_forward_hook(self._capture_loss, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.session.begin_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # The Trainer has clipped already; the gradients stay in place through the update.
        self.session.before_update(stash=False)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._record(control)

    def on_step_end(self, args, state, control, **kwargs):
        if not HAS_OPTIMIZER_EVENTS:  # older transformers: after zero_grad, so no gradients
            self.session.before_update(stash=False)
            self._record(control)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        values = {"val_" + k[len("eval_"):]: v for k, v in (metrics or {}).items()
                  if k.startswith("eval_") and not k.endswith(_TIMING)}
        self.session.evaluated(values)

    def on_save(self, args, state, control, **kwargs):
        if self.session.active and self.session.run is not None:
            self.session.run.save_state(int(state.global_step), self.session.state_dict(), kind=STATE_KIND)

    def on_train_end(self, args, state, control, **kwargs):
        self.session.close("finished")
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ internals
    def _capture_loss(self, module, args, kwargs, output) -> None:
        if not module.training or not self.session.active:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if torch.is_tensor(loss) and loss.numel() == 1:
            self._losses.append((loss.detach().float(), kwargs.get("num_items_in_batch") is not None))

    def _step_loss(self) -> torch.Tensor | None:
        if not self._losses:
            return None
        values = torch.stack([v.reshape(()) for v, _ in self._losses])
        summed = any(scaled for _, scaled in self._losses)  # each divided by the step's token count
        self._losses = []
        return values.sum() if summed else values.mean()

    def _record(self, control) -> None:
        if not self.session.active:
            return
        if not self.session.after_update(self._step_loss()):
            control.should_training_stop = True

    def _default_config(self, args, model) -> dict[str, Any]:
        s = self.session
        training = {k: v for k, v in args.to_dict().items() if k in _TRAINING_ARGS}
        model_cfg = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
        model_cfg.pop("transformers_version", None)  # the same model under another release is the same run
        return {"integration": "hf", "model_class": type(model).__name__, "model": jsonable(model_cfg),
                "training": jsonable(training), "record": s.record.model_dump(mode="json"),
                "callbacks": [getattr(cb, "name", type(cb).__name__) for cb in s.callbacks]}


__all__ = ["HAS_OPTIMIZER_EVENTS", "TrajscopeCallback"]
