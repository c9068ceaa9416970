"""What a workload is: data, model, loss, metric and a validation target, by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from trajscope.errors import UsageError, unknown_choice


@dataclass(frozen=True)
class Data:
    """In-memory tensors of one workload. ``x_*`` float32 inputs, ``y_*`` int64 class labels."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    num_classes: int

    def __post_init__(self):
        if len(self.x_train) != len(self.y_train) or len(self.x_val) != len(self.y_val):
            raise ValueError("inputs and labels differ in length")


def split_by_seed(x, y, num_val: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_val, y_val) as tensors: a random permutation drawn from
    ``numpy.random.RandomState(seed)`` puts its first ``num_val`` examples in validation."""
    import numpy as np

    perm = np.random.RandomState(seed).permutation(len(y))
    train, val = perm[num_val:], perm[:num_val]
    return (torch.from_numpy(x[train]), torch.from_numpy(y[train]),
            torch.from_numpy(x[val]), torch.from_numpy(y[val]))


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over the batch (nats)."""
    return F.cross_entropy(logits, y)


def mse_one_hot(logits: Tensor, y: Tensor) -> Tensor:
    """Mean over the batch of the squared error to the one-hot target, summed over classes / 2."""
    target = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return 0.5 * (logits - target).pow(2).sum(-1).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": cross_entropy,
    "mse": mse_one_hot,
}


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of examples whose arg-max class equals the label, in [0, 1]."""
    return (logits.argmax(-1) == y).float().mean().item()


@dataclass(frozen=True)
class Workload:
    """A named training problem.

    ``make_data(seed, options)`` returns the :class:`Data` (deterministic in ``seed``; made or read
    from a local path, never downloaded). ``make_model(options)`` builds the model, drawing its
    initial weights from torch's global generator (the trainer seeds it first). ``loss`` names an
    entry of :data:`LOSSES`; the metric is validation accuracy, and ``target`` is the accuracy a
    run must reach to count as trained. ``defaults`` holds the training hyperparameters the workload
    is tuned for (keys of :class:`trajscope.config.RunConfig`); ``options`` the workload's own knobs
    (e.g. ``width``, ``data_dir``) with their defaults.
    """

    name: str
    description: str
    make_data: Callable[[int, Mapping[str, Any]], Data]
    make_model: Callable[[Mapping[str, Any]], nn.Module]
    loss: str
    target: float
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def loss_fn(self, logits: Tensor, y: Tensor) -> Tensor:
        return LOSSES[self.loss](logits, y)

    def metric_fn(self, logits: Tensor, y: Tensor) -> float:
        return accuracy(logits, y)

    def resolve_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """The workload's options with defaults filled in; an unknown option is a UsageError."""
        options = dict(options or {})
        unknown = set(options) - set(self.options)
        if unknown:
            raise unknown_choice(f"option for workload {self.name!r}", sorted(unknown)[0], self.options)
        return {**self.options, **options}


_REGISTRY: dict[str, Workload] = {}


def register(workload: Workload) -> Workload:
    if workload.name in _REGISTRY:
        raise ValueError(f"workload {workload.name!r} registered twice")
    _REGISTRY[workload.name] = workload
    return workload


def get(name: str) -> Workload:
    """The workload called ``name``; an unknown name raises a one-line UsageError listing all."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_choice("workload", name, _REGISTRY) from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def all_workloads() -> list[Workload]:
    return [_REGISTRY[n] for n in names()]


