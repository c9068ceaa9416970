"""Where a model's parameters live when it trains on several processes (torch.distributed).

The :class:`~trajscope.record.Recorder` finds one of three layouts from the model it is given:

- ``single``: no process group, or a world of one: this process holds every parameter.
- ``replicated`` (``DistributedDataParallel``): every rank holds every parameter and, after each
  optimizer step, the same values. Rank 0 measures and writes; every rank takes part in one
  ``all_reduce`` per ``reduce_every`` steps (default 8) that averages their losses (each rank's
  loss is that of its part of the global batch) and agrees on divergence; it completes during
  the next step (:class:`PendingReduction`).
- ``sharded`` (FSDP2, ``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded on
  dim 0 over a 1-D device mesh. Every rank measures its local shards; squared norms and sketches
  are summed with one ``all_reduce`` (the sketch is generated from (seed, name, global offset), so
  the sum of the shards' sketches is exactly the sketch of the whole vector). Full tensors are
  gathered (a collective on every rank) only on the snapshot schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trajscope.errors import UsageError

MODES = ("single", "replicated", "sharded")


@dataclass(frozen=True)
class Layout:
    """How this process holds the parameters: ``mode`` (one of MODES), its rank in ``group``."""

    mode: str = "single"
    rank: int = 0
    world: int = 1
    group: Any = None
    device: torch.device = torch.device("cpu")  # where the backend takes tensors (cuda for nccl)

    @property
    def writer(self) -> bool:
        """Rank 0 writes the run; the others only take part in the collectives."""
        return self.rank == 0

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks, in place (nothing for a single process)."""
        if self.mode != "single":
            import torch.distributed as dist

            dist.all_reduce(t, group=self.group)
        return t


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (whose names lack the ``module.`` prefix)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def detect(params: list[Tensor], group=None) -> Layout:
    """The layout of ``params`` in the default process group (or ``group``)."""
    import torch.distributed as dist

    sharded = any(is_dtensor(p) for p in params)
    if not (dist.is_available() and dist.is_initialized()):
        return Layout()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend(group)).lower():
        device = torch.device("cuda", torch.cuda.current_device())
    if sharded:
        for p in params:
            if is_dtensor(p) and p.device_mesh.ndim != 1:
                raise UsageError(f"recording a {p.device_mesh.ndim}-D device mesh is not supported "
                                 "(FSDP2 over a 1-D mesh only)")
        return Layout("sharded", rank, world, group, device)
    return Layout("single") if world == 1 else Layout("replicated", rank, world, group, device)


def local_slice(name: str, t: Tensor | None, layout: Layout) -> tuple[Tensor | None, int]:
    """(this rank's part of ``t`` flattened row-major, the flat index of its first element in the
    full tensor). Under ``sharded``, a DTensor sharded on dim 0 gives its local rows; a replicated
    tensor (plain or DTensor ``Replicate``) counts on rank 0 only (an empty part elsewhere), so that
    sums over ranks count every element once."""
    if t is None or layout.mode != "sharded":
        return t, 0
    if not is_dtensor(t):
        return (t if layout.rank == 0 else t.reshape(-1)[:0]), 0
    kinds = [type(p).__name__ for p in t.placements]
    local = t.to_local()
    if kinds == ["Replicate"]:
        return (local if layout.rank == 0 else local.reshape(-1)[:0]), 0
    if kinds != ["Shard"] or t.placements[0].dim != 0:
        raise UsageError(f"parameter {name!r} is placed as {t.placements}; recording supports "
                         "Shard(0) (FSDP2's default) and Replicate")
    row = math.prod(t.shape[1:])
    # torch.chunk's rule, which FSDP2 follows: ceil(n0 / world) rows per rank, the last ones shorter.
    per = -(-t.shape[0] // layout.world) if t.shape[0] else 0
    start = min(layout.rank * per, t.shape[0])
    if local.shape[0] != max(0, min(per, t.shape[0] - start)):
        raise UsageError(f"parameter {name!r}: local shard of {local.shape[0]} rows on rank {layout.rank} "
                         f"does not follow the even dim-0 split of {t.shape[0]} rows over {layout.world} ranks")
    return local, start * row


def full(t: Tensor) -> Tensor:
    """The whole tensor (a collective for a DTensor: every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t


class PendingReduction:
    """Under DDP, the ``[loss, non-finite flag]`` of ``every`` steps in one all_reduce, started
    without waiting (``async_op``) once that many steps are queued and finished at the next step.

    Collectives of a group run in order, so by the time the next step's gradient all-reduce is
    done this one is too, and no rank ever waits for it. An extra collective per step cost ~7% of
    a small CNN's DDP step (gloo, 2 CPU processes), hence the batches. The cost: the loss and a
    divergence of step t become known up to ``every`` steps later (at the latest at ``finish(
    flush=True)``, which every rank calls at close)."""

    def __init__(self, layout: Layout, every: int = 8):
        if every < 1:
            raise UsageError(f"reduce_every must be >= 1, got {every}")
        self.layout, self.every = layout, every
        self._queued: list[tuple[int, float | None]] = []  # (step, loss), not yet sent
        self._pending = None

    def add(self, step: int, loss: float | None) -> None:
        """Queue one step; once :attr:`due`, call :meth:`start` (after :meth:`finish`: one
        reduction in flight at a time)."""
        self._queued.append((step, loss))

    @property
    def due(self) -> bool:
        return len(self._queued) >= self.every

    def start(self, flagged: dict[int, bool]) -> None:
        """Start the reduction of the queued steps, with this rank's verdicts ``flagged[step]``
        (taken out of the dict; a step missing from it counts as finite)."""
        import torch.distributed as dist

        rows = self._queued
        self._queued = []
        vec = torch.tensor([[0.0 if loss is None else loss for _, loss in rows],
                            [float(flagged.pop(step, False)) for step, _ in rows]], device=self.layout.device)
        work = dist.all_reduce(vec, group=self.layout.group, async_op=True)
        self._pending = (rows, vec, work)

    def finish(self, flush: bool = False, flagged: dict[int, bool] | None = None) -> list[tuple[int, float | None, bool]]:
        """[(step, loss averaged over ranks or None, whether any rank flagged it)] of the reduction
        in flight (and, with ``flush``, of the queued steps too, reduced now with ``flagged``),
        in step order."""
        if flush and self._queued:
            done = self.finish()
            self.start({} if flagged is None else flagged)
            return done + self.finish()
        if self._pending is None:
            return []
        rows, vec, work = self._pending
        self._pending = None
        work.wait()
        totals, flags = vec.tolist()
        return [(step, None if loss is None else total / self.layout.world, flag > 0)
                for (step, loss), total, flag in zip(rows, totals, flags)]
