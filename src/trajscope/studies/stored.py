"""The model of a stored run at a snapshot step and its predictions (used by the explr study)."""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from trajscope.config import RunConfig
from trajscope.studies.common import init_model, opened


def config_of(summary: Mapping[str, Any]) -> RunConfig:
    """The RunConfig a run was trained with (from its stored config)."""
    with opened(summary) as run:
        return RunConfig(**run.config)


def model_at(summary: Mapping[str, Any], step: int) -> nn.Module:
    """The run's model holding its ``params`` snapshot of ``step`` and, where the run recorded
    them, its ``buffers`` snapshot of that step (BatchNorm running statistics); eval mode."""
    model, _, _ = init_model(config_of(summary))
    with opened(summary) as run:
        state = dict(run.load_snapshot(step, "params"))
        if step in run.snapshot_steps("buffers"):
            state.update(run.load_snapshot(step, "buffers"))
    model.load_state_dict(state, strict=False)
    return model.eval()


@torch.no_grad()
def predictions(model: nn.Module, x: Tensor, chunk: int = 4096, batch_stats: bool = False) -> Tensor:
    """Arg-max class of each input, (N,) int64. Eval mode, or with ``batch_stats`` BatchNorm
    normalizing with the statistics of each chunk of ``x`` (training mode on a copy, so the running
    statistics are not used and not changed): the form in which a BatchNorm network is exactly
    invariant to the scale of the weights before it."""
    if batch_stats:
        model = copy.deepcopy(model).train()
    else:
        model.eval()
    return torch.cat([model(x[i:i + chunk]).argmax(-1) for i in range(0, len(x), chunk)])
