"""Probes that evaluate the model on the training set (the trainer evaluates only the validation set).

Both run at STEP_END on their schedule, with the model in eval mode (restored after) and no
gradients, on the first ``size`` training examples (all of them when ``size`` is None), in chunks of
4,096.

``train_metrics`` (:class:`TrainMetricsProbe`) writes ``loss``, the workload's loss (its mean over
the examples), and ``accuracy``, the fraction whose arg-max class is the label.

``bucket_loss`` (:class:`BucketLossProbe`) writes the mean loss per class-frequency bucket: the
classes are sorted by their count in the whole training set (most frequent first, ties by class
index) and cut into ``buckets`` consecutive groups holding about equal numbers of training
examples (:func:`frequency_buckets`; Kunstner et al. 2024, whose groups each hold about a tenth
of the data), so with heavy-tailed classes the first bucket is one or a few frequent classes and
the last many rare ones. ``bucket<i>`` is the mean loss over the examples of bucket i (0 = most
frequent; NaN for a bucket left empty because one class holds more than a bucket's share);
``loss`` the mean over all of them.
"""

from __future__ import annotations

import torch

from trajscope.events import StepContext
from trajscope.probes.base import Probe, register


def frequency_buckets(labels: torch.Tensor, num_classes: int, buckets: int) -> torch.Tensor:
    """(num_classes,) int64: the bucket of each class (module docstring). Class c goes to bucket
    floor(buckets * (examples of the classes before c in frequency order) / total), so every bucket
    starts where the cumulative count crosses a multiple of total / buckets; classes that never
    occur go to the last bucket."""
    counts = torch.bincount(labels, minlength=num_classes)
    order = sorted(range(num_classes), key=lambda c: (-int(counts[c]), c))
    out = torch.empty(num_classes, dtype=torch.int64)
    total, seen = int(counts.sum()), 0
    for c in order:
        out[c] = min(buckets * seen // max(total, 1), buckets - 1)
        seen += int(counts[c])
    return out


class _TrainingSetProbe(Probe):
    needs = frozenset({"data", "loss_fn"})

    def __init__(self, schedule=None, name: str | None = None, *, every: int | None = None,
                 size: int | None = None):
        super().__init__(schedule, name, every=every)
        self.size = size

    @torch.no_grad()
    def logits(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = ctx.data.x_train, ctx.data.y_train
        if self.size is not None:
            x, y = x[:self.size], y[:self.size]
        was = ctx.model.training
        ctx.model.eval()
        try:
            out = torch.cat([ctx.model(x[i:i + 4096]) for i in range(0, len(x), 4096)])
        finally:
            ctx.model.train(was)
        return out, y


@register
class TrainMetricsProbe(_TrainingSetProbe):
    """Loss and accuracy on the training set (module docstring)."""

    default_name = "train_metrics"

    def measure(self, ctx: StepContext) -> dict[str, float]:
        logits, y = self.logits(ctx)
        return {"loss": float(ctx.loss_fn(logits, y)), "accuracy": float((logits.argmax(-1) == y).float().mean())}


@register
class BucketLossProbe(_TrainingSetProbe):
    """Mean training loss per class-frequency bucket (module docstring)."""

    default_name = "bucket_loss"

    def __init__(self, schedule=None, name: str | None = None, *, every: int | None = None,
                 size: int | None = None, buckets: int = 10):
        super().__init__(schedule, name, every=every, size=size)
        self.buckets = int(buckets)
        self._of_class: torch.Tensor | None = None

    def measure(self, ctx: StepContext) -> dict[str, float]:
        if self._of_class is None:
            self._of_class = frequency_buckets(ctx.data.y_train, ctx.data.num_classes, self.buckets)
        logits, y = self.logits(ctx)
        bucket = self._of_class[y]
        out = {"loss": float(ctx.loss_fn(logits, y))}
        for b in range(self.buckets):
            idx = torch.nonzero(bucket == b).ravel()
            out[f"bucket{b}"] = float(ctx.loss_fn(logits[idx], y[idx])) if len(idx) else float("nan")
        return out
