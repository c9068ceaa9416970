"""The model of a stored run at a snapshot step, its predictions, and which of its parameters are
scale-invariant (used by the explr and grokking studies)."""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

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
def predictions(model: nn.Module, x: Tensor, chunk: int = 4096) -> Tensor:
    """Arg-max class of each input, (N,) int64, in eval mode."""
    model.eval()
    return torch.cat([model(x[i:i + chunk]).argmax(-1) for i in range(0, len(x), chunk)])


def scale_invariant_names(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                          batch: tuple[Tensor, Tensor], names: Sequence[str] | None = None,
                          factor: float = 3.0, rtol: float = 1e-4) -> list[str]:
    """The parameters p for which the training-mode loss on ``batch`` is unchanged (within relative
    ``rtol``) when p alone is multiplied by ``factor``: e.g. a convolution weight followed by
    BatchNorm. Checked on a copy of the model (the running statistics of the original are kept).
    BatchNorm's eps makes the invariance approximate (relative error about eps / variance), hence
    the tolerance."""
    work = copy.deepcopy(model).train()
    x, y = batch
    with torch.no_grad():
        base = float(loss_fn(work(x), y))
        out = []
        for name, p in work.named_parameters():
            if names is not None and name not in names:
                continue
            keep = p.detach().clone()
            p.mul_(factor)
            changed = float(loss_fn(work(x), y))
            p.copy_(keep)
            if abs(changed - base) <= rtol * max(abs(base), 1e-12):
                out.append(name)
    return out
