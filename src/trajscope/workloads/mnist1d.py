"""MNIST-1D (Greydanus & Kobak, 2020): ``mnist1d-mlp``, ``mnist1d-cnn`` and ``mnist1d-mlp-mse``.

The data set is *generated* with ``mnist1d.data.make_dataset`` (never downloaded): 5,000 signals of
length 40, 4,000 for training and 1,000 for validation, 10 classes, the generator's seed set from
the workload seed. Inputs are standardized per feature with the training set's mean and standard
deviation. Shapes: ``x_train`` (4000, 40) float32, ``y_train`` (4000,) int64, ``x_val`` (1000, 40),
``y_val`` (1000,).

``mnist1d-mlp-mse`` is the same MLP trained with the MSE loss to one-hot targets and plain SGD
(the set-up of the catapult and edge-of-stability studies); its option ``samples`` (default 5,000)
sets how many signals are generated, 80% of them for training (``samples=6250``: a 5,000-example
training set, e.g. for full-batch gradient descent).
"""

from __future__ import annotations

import functools
import random
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from trajscope.errors import UsageError
from trajscope.workloads.base import Data, Workload, register

NUM_FEATURES = 40
NUM_CLASSES = 10


@functools.lru_cache(maxsize=8)
def _generate(seed: int, samples: int = 5000) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val) for ``seed`` (``samples`` signals, 80% for training),
    standardized; cached, never mutated."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = int(seed)
    args.num_samples = int(samples)
    # make_dataset seeds the global ``random`` and ``numpy.random`` generators: put them back.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x_train = np.asarray(raw["x"], dtype=np.float64)
    x_val = np.asarray(raw["x_test"], dtype=np.float64)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    return (
        torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
        torch.from_numpy(np.asarray(raw["y"], dtype=np.int64)),
        torch.from_numpy(((x_val - mean) / std).astype(np.float32)),
        torch.from_numpy(np.asarray(raw["y_test"], dtype=np.int64)),
    )


def make_data(seed: int, options: Mapping[str, Any] | None = None) -> Data:
    """MNIST-1D generated with ``seed`` (of the options only ``samples`` is read); fresh clones."""
    samples = int((options or {}).get("samples", 5000))
    if samples < 50:
        raise UsageError(f"mnist1d needs samples >= 50, got {samples}")
    x_train, y_train, x_val, y_val = (t.clone() for t in _generate(int(seed), samples))
    return Data(x_train, y_train, x_val, y_val, NUM_CLASSES)


def make_mlp(options: Mapping[str, Any] | None = None) -> nn.Module:
    """MLP 40 -> width (x depth hidden layers, ReLU) -> 10 logits; input (B, 40)."""
    o = {**MLP_OPTIONS, **(options or {})}
    if int(o["depth"]) < 0 or int(o["width"]) < 1:
        raise UsageError(f"mnist1d MLP needs depth >= 0 and width >= 1, got depth={o['depth']}, width={o['width']}")
    layers: list[nn.Module] = []
    fan_in = NUM_FEATURES
    for _ in range(int(o["depth"])):
        layers += [nn.Linear(fan_in, int(o["width"])), nn.ReLU()]
        fan_in = int(o["width"])
    layers.append(nn.Linear(fan_in, NUM_CLASSES))
    return nn.Sequential(*layers)


class Conv1dNet(nn.Module):
    """Three stride-2 Conv1d(kernel 5) + BatchNorm1d + ReLU layers, then a linear read-out.

    Input (B, 40) is viewed as one channel of length 40; the length halves per layer
    (40 -> 20 -> 10 -> 5), and the (B, width * 5) features map to (B, 10) logits.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 1
        for _ in range(3):
            blocks += [nn.Conv1d(c_in, width, 5, stride=2, padding=2, bias=False),
                       nn.BatchNorm1d(width), nn.ReLU()]
            c_in = width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(width * NUM_FEATURES // 8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


def make_cnn(options: Mapping[str, Any] | None = None) -> nn.Module:
    o = {**CNN_OPTIONS, **(options or {})}
    return Conv1dNet(int(o["width"]))


MLP_OPTIONS = {"width": 256, "depth": 2}
CNN_OPTIONS = {"width": 32}

register(Workload(
    name="mnist1d-mlp",
    description="MNIST-1D (generated, 4000/1000, 40 features) with a ReLU MLP 40-256-256-10",
    make_data=make_data,
    make_model=make_mlp,
    loss="cross_entropy",
    target=0.70,
    defaults={"optimizer": "sgd", "lr": 0.25, "momentum": 0.9, "nesterov": False,
              "weight_decay": 0.0, "batch_size": 128, "steps": 3000,
              "schedule": "warmup-cosine", "warmup_steps": 0, "eval_every": 100},
    options=MLP_OPTIONS,
))

register(Workload(
    name="mnist1d-cnn",
    description="MNIST-1D (generated, 4000/1000, 40 features) with a 3-layer 1-D CNN + BatchNorm",
    make_data=make_data,
    make_model=make_cnn,
    loss="cross_entropy",
    target=0.90,
    defaults={"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
              "weight_decay": 0.0, "batch_size": 128, "steps": 2000,
              "schedule": "warmup-cosine", "warmup_steps": 0, "eval_every": 100},
    options=CNN_OPTIONS,
))

MLP_MSE_OPTIONS = {**MLP_OPTIONS, "samples": 5000}

register(Workload(
    name="mnist1d-mlp-mse",
    description="MNIST-1D (generated, 80/20 split of 'samples') with a ReLU MLP, MSE to one-hot, plain SGD",
    make_data=make_data,
    make_model=make_mlp,
    loss="mse",
    target=0.50,
    defaults={"optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "nesterov": False,
              "weight_decay": 0.0, "batch_size": 128, "steps": 1000,
              "schedule": "constant", "warmup_steps": 0, "eval_every": 100},
    options=MLP_MSE_OPTIONS,
))
