"""``cifar10-resnet20``: ResNet-20 (He et al. 2016) on CIFAR-10, read from local python batches.

Data: the standard "CIFAR-10 python version" files ``data_batch_1`` .. ``data_batch_5`` and
``test_batch`` in ``options["data_dir"]`` (default: ``$TRAJSCOPE_CIFAR10_DIR``); each is a pickled
dict with ``b'data'`` (N, 3072) uint8, rows laid out channel-major (R plane, G plane, B plane, each
32x32 row-major), and ``b'labels'`` (N ints). Files are read with a restricted unpickler that can
only rebuild numpy arrays, so a file never executes code. Nothing is downloaded. With
``synthetic=True`` the data are instead a SYNTHETIC CIFAR-shaped stand-in (10 smooth random
class templates plus noise, 5,000 train / 1,000 val), deterministic in the seed; it exercises the
pipeline, its accuracies say nothing about CIFAR-10. Inputs are normalized per channel with the
training set's mean and std. Shapes: ``x_*`` (N, 3, 32, 32) float32, ``y_*`` (N,) int64; real data
N = 50,000 train / 10,000 val (the fixed test batch; the seed does not change the real split).
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trajscope.errors import DataNotFoundError
from trajscope.workloads.base import Data, Workload, register

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
VAL_FILE = "test_batch"
EXPECTED = "data_batch_1..data_batch_5, test_batch"
ENV_VAR = "TRAJSCOPE_CIFAR10_DIR"


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar,
               "_frombuffer": numeric._frombuffer}
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for prefix in ("numpy.core", "numpy._core"):
        for name, obj in allowed.items():
            module = "numeric" if name == "_frombuffer" else "multiarray"
            table[(f"{prefix}.{module}", name)] = obj
    import codecs
    table[("_codecs", "encode")] = codecs.encode  # protocol-2 pickles of bytes written by python 3
    return table


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler whose only reachable globals rebuild numpy arrays and bytes."""

    table = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.table[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None


def load_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: images (N, 3, 32, 32) uint8 and labels (N,) int64.

    Raises DataNotFoundError (one line) if the file is absent, unsafe or malformed.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = batch[b"data"]
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
                or data.shape[1] != 3072 or labels.shape != (len(data),)
                or (labels.size and not 0 <= labels.min() <= labels.max() <= 9)):
            raise ValueError("expected b'data' uint8 (N, 3072) and N b'labels' in 0..9")
    except FileNotFoundError:
        raise DataNotFoundError(f"cifar10-resnet20: missing {path}") from None
    except Exception as e:  # noqa: BLE001 - anything a hostile or broken file causes
        msg = str(e).replace("\n", " ")
        raise DataNotFoundError(
            f"refusing to load {path}: not a CIFAR-10 python batch ({type(e).__name__}: {msg})"
        ) from None
    return data.reshape(-1, 3, 32, 32), labels


@functools.lru_cache(maxsize=2)
def _real(data_dir: str) -> tuple[torch.Tensor, ...]:
    root = Path(data_dir)
    missing = [n for n in (*TRAIN_FILES, VAL_FILE) if not (root / n).is_file()]
    if missing:
        raise DataNotFoundError(f"cifar10-resnet20 needs the CIFAR-10 python batches in {root}: "
                                f"{EXPECTED} (missing: {', '.join(missing)})")
    parts = [load_batch(root / n) for n in TRAIN_FILES]
    x_val, y_val = load_batch(root / VAL_FILE)
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    return _normalize(x_train.astype(np.float32), y_train, x_val.astype(np.float32), y_val)


@functools.lru_cache(maxsize=4)
def _synthetic(seed: int, n_train: int = 5000, n_val: int = 1000) -> tuple[torch.Tensor, ...]:
    """10 smooth random templates (8x8 noise upsampled to 32x32) + per-image gain and noise."""
    rng = np.random.RandomState(seed)
    coarse = torch.from_numpy(rng.randn(10, 3, 8, 8).astype(np.float32))
    templates = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False).numpy()
    y = rng.randint(0, 10, size=n_train + n_val).astype(np.int64)
    gain = rng.uniform(0.5, 1.5, size=(n_train + n_val, 1, 1, 1)).astype(np.float32)
    noise = rng.randn(n_train + n_val, 3, 32, 32).astype(np.float32)
    x = 128 + 40 * (gain * templates[y] + 1.5 * noise)
    return _normalize(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def _normalize(x_train, y_train, x_val, y_val) -> tuple[torch.Tensor, ...]:
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = x_train.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64) + 1e-8
    norm = lambda x: torch.from_numpy(((x - mean) / std).astype(np.float32))  # noqa: E731
    return norm(x_train), torch.from_numpy(y_train), norm(x_val), torch.from_numpy(y_val)


def make_data(seed: int, options: Mapping[str, Any] | None = None) -> Data:
    """CIFAR-10 from ``data_dir`` (or ``$TRAJSCOPE_CIFAR10_DIR``), or synthetic if asked.

    The returned tensors are shared with an in-process cache: do not modify them in place.
    """
    o = {**OPTIONS, **(options or {})}
    if o["synthetic"]:
        return Data(*_synthetic(int(seed)), num_classes=10)
    data_dir = o["data_dir"] or os.environ.get(ENV_VAR)
    if not data_dir:
        raise DataNotFoundError(
            f"cifar10-resnet20 needs the CIFAR-10 python batches ({EXPECTED}) in a directory: "
            f"set the option data_dir or ${ENV_VAR}, or use the option synthetic=true")
    return Data(*_real(str(Path(data_dir).expanduser().resolve())), num_classes=10)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus an option-A shortcut (stride-2 subsample, zero-pad)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 inputs: conv-BN-ReLU, 3 stages x 3 blocks (16/32/64), avg-pool, linear.

    Input (B, 3, 32, 32); output (B, 10) logits. 269,722 parameters, 1,376 of them BN scalars.
    """

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(h.mean(dim=(2, 3)))


def make_model(options: Mapping[str, Any] | None = None) -> nn.Module:
    return ResNet20()


OPTIONS = {"data_dir": None, "synthetic": False}

register(Workload(
    name="cifar10-resnet20",
    description="ResNet-20 on CIFAR-10 from local python batches (or synthetic=true stand-in)",
    make_data=make_data,
    make_model=make_model,
    loss="cross_entropy",
    target=0.80,
    defaults={"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
              "weight_decay": 5e-4, "batch_size": 128, "steps": 2000,
              "schedule": "warmup-cosine", "warmup_steps": 0, "eval_every": 200},
    options=OPTIONS,
))
