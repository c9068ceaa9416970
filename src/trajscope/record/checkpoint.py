"""Full checkpoints: model state, optimizer state and every RNG state, for rewinding and resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn


def rng_state() -> dict[str, Any]:
    """The states of torch's CPU (and CUDA) generators, Python's ``random`` and NumPy's global one."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to continue training exactly: ``{"model", "optimizer", "rng", "extra"}``."""
    return {
        "model": dict(model.state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a :func:`capture` into ``model`` (and ``optimizer``), set the RNG states, return ``extra``."""
    model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state.get("extra", {})
