"""The reference trainer, its per-step context and callbacks, and the optimizer factory."""

from trajscope.train.optim import make_optimizer, schedule_factor
from trajscope.train.trainer import BatchSampler, Callback, StepContext, Trainer, summary

__all__ = ["BatchSampler", "Callback", "StepContext", "Trainer", "make_optimizer", "schedule_factor", "summary"]
