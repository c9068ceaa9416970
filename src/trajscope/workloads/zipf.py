"""``zipf-classes``: a generated classification task with Zipf-distributed class frequencies (the
heavy-tailed class imbalance of Kunstner et al. 2024, "Heavy-tailed class imbalance and why Adam
outperforms gradient descent on language models").

Generation, deterministic in the seed (``numpy.random.RandomState(seed)``, drawn in this order):

1. class frequencies pi_k = (k + 1)^(-exponent) / sum_j (j + 1)^(-exponent), k = 0..C-1 (class 0 the
   most frequent; ``exponent`` 0 gives uniform classes);
2. class means mu_k ~ N(0, I_d) (d = ``dim``), one per class;
3. ``train + val`` labels drawn i.i.d. from pi (the first ``train`` for training), so the
   validation set has the same imbalance;
4. inputs x = mu_y + ``noise`` * eps with eps ~ N(0, I_d).

Shapes: x_train (train, dim) float32, y_train (train,) int64, x_val (val, dim), y_val (val,).
Model: a one-hidden-layer ReLU MLP dim -> ``width`` -> C (``width`` 0: a linear softmax model),
cross-entropy. Defaults: C = 1,000, d = 32, noise 1.0, 4,000 training and 2,000 validation examples,
exponent 1.0, width 0 (the linear model: the imbalance alone, no depth, is what slows gradient
descent on the rare classes).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from trajscope.errors import UsageError
from trajscope.workloads.base import Data, Workload, register

OPTIONS = {"num_classes": 1000, "dim": 32, "noise": 1.0, "train": 4000, "val": 2000, "exponent": 1.0,
           "width": 0}


def zipf_frequencies(num_classes: int, exponent: float) -> np.ndarray:
    """pi_k proportional to (k + 1)^(-exponent), summing to 1; (num_classes,) float64."""
    w = np.arange(1, num_classes + 1, dtype=np.float64) ** (-float(exponent))
    return w / w.sum()


@functools.lru_cache(maxsize=8)
def _generate(seed: int, num_classes: int, dim: int, noise: float, train: int, val: int, exponent: float):
    if num_classes < 2 or dim < 1 or train < 1 or val < 1 or noise < 0:
        raise UsageError(f"zipf-classes needs num_classes >= 2, dim, train, val >= 1 and noise >= 0; got "
                         f"{num_classes}, {dim}, {train}, {val}, {noise}")
    rng = np.random.RandomState(seed)
    pi = zipf_frequencies(num_classes, exponent)
    means = rng.standard_normal((num_classes, dim))
    y = rng.choice(num_classes, size=train + val, p=pi)
    x = means[y] + noise * rng.standard_normal((train + val, dim))
    x, y = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
    return x[:train], y[:train], x[train:], y[train:]


def make_data(seed: int, options: Mapping[str, Any] | None = None) -> Data:
    o = {**OPTIONS, **(options or {})}
    parts = _generate(int(seed), int(o["num_classes"]), int(o["dim"]), float(o["noise"]), int(o["train"]),
                      int(o["val"]), float(o["exponent"]))
    x_train, y_train, x_val, y_val = (t.clone() for t in parts)
    return Data(x_train, y_train, x_val, y_val, int(o["num_classes"]))


def make_model(options: Mapping[str, Any] | None = None) -> nn.Module:
    o = {**OPTIONS, **(options or {})}
    d, c, w = int(o["dim"]), int(o["num_classes"]), int(o["width"])
    if w <= 0:
        return nn.Sequential(nn.Linear(d, c))
    return nn.Sequential(nn.Linear(d, w), nn.ReLU(), nn.Linear(w, c))


register(Workload(
    name="zipf-classes",
    description="generated Gaussian-mixture classes with Zipf frequencies (1000 classes, 32-d), linear softmax",
    make_data=make_data,
    make_model=make_model,
    loss="cross_entropy",
    target=0.5,  # nominal: the study compares optimizers per frequency bucket, not to a target
    defaults={"optimizer": "sgd", "lr": 10.0, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 4000,
              "steps": 400, "schedule": "constant", "warmup_steps": 0, "eval_every": 50},
    options=OPTIONS,
))
