"""``digits-mlp``: scikit-learn's 8x8 handwritten digits (1,797 images shipped with sklearn).

The split is a seeded random permutation: 1,437 training and 360 validation images. Pixels (0..16)
are divided by 16, so inputs lie in [0, 1]. Shapes: ``x_train`` (1437, 64) float32, ``y_train``
(1437,) int64, ``x_val`` (360, 64), ``y_val`` (360,); 10 classes.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from trajscope.workloads.base import Data, Workload, register, split_by_seed

NUM_VAL = 360
NUM_CLASSES = 10


@functools.lru_cache(maxsize=8)
def _split(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (np.asarray(digits.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    return split_by_seed(x, y, NUM_VAL, seed)


def make_data(seed: int, options: Mapping[str, Any] | None = None) -> Data:
    """The digits split by ``seed`` (options are model-only and ignored); fresh clones."""
    x_train, y_train, x_val, y_val = (t.clone() for t in _split(int(seed)))
    return Data(x_train, y_train, x_val, y_val, NUM_CLASSES)


def make_model(options: Mapping[str, Any] | None = None) -> nn.Module:
    """MLP 64 -> width (ReLU) -> 10 logits; input (B, 64)."""
    width = int({**OPTIONS, **(options or {})}["width"])
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, NUM_CLASSES))


OPTIONS = {"width": 128}

register(Workload(
    name="digits-mlp",
    description="sklearn 8x8 digits (1437/360 split by seed) with a ReLU MLP 64-128-10",
    make_data=make_data,
    make_model=make_model,
    loss="cross_entropy",
    target=0.94,
    defaults={"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 64,
              "steps": 1000, "schedule": "constant", "warmup_steps": 0, "eval_every": 50},
    options=OPTIONS,
))
