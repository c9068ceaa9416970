"""Where a model's parameters live when it trains on several processes (torch.distributed).

The :class:`~trajscope.record.Recorder` finds one of three layouts from the model it is given:

- ``single``: no process group, or a world of one: this process holds every parameter.
- ``replicated`` (``DistributedDataParallel``): every rank holds every parameter and, after each
  optimizer step, the same values. Rank 0 writes the run and its snapshots (copied on their
  steps only) and measures nothing; ranks 1 .. world-1 each take a contiguous part of the flat
  parameter vector (:func:`measured_part`) and compute, for it, the squared norms of the
  parameters, gradients and update and the partial sketch. (Halving the part a rank measures
  saved nothing on a 12k-parameter CNN: each call's cost is fixed, not per byte; so the work is
  moved off the writer instead.)
- ``sharded`` (FSDP2, ``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded on
  dim 0 over a 1-D device mesh. Every rank measures its local shards. Full tensors are gathered
  (a collective on every rank) only on the snapshot schedule.

In both distributed layouts the parts' squared norms and sketches are summed over the ranks (the
sketch is generated from (seed, name, global offset), so the sum of the parts' sketches is
exactly the sketch of the whole vector), together with the losses (averaged: each rank's loss is
that of its part of the global batch), ``reduce_every`` steps (default 8) in one asynchronous
``all_reduce`` (:class:`PendingReduction`), finished when the next one starts: then rank 0
writes the steps of one batch while the other ranks measure those of the next (the ranks meet at
every gradient all-reduce, so work done in the same step costs the slowest rank's share, work
in different steps the sum). Every rank takes the same decision on divergence, up to
``2 * reduce_every - 1`` steps after it.
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


def split(sizes: list[int], rank: int, world: int) -> list[tuple[int, int, int]]:
    """Part ``rank`` of ``world`` of the concatenation of tensors of ``sizes`` elements:
    ``[(tensor index, first element, end element)]``, the elements ``rank * P // world .. (rank +
    1) * P // world - 1`` of the P in all (contiguous; at most two tensors cut); the parts cover
    every element once."""
    total = sum(sizes)
    lo, hi = rank * total // world, (rank + 1) * total // world
    out, start = [], 0
    for j, n in enumerate(sizes):
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            out.append((j, a - start, b - start))
        start += n
    return out


def measured_part(sizes: list[int], rank: int, world: int) -> list[tuple[int, int, int]]:
    """What rank ``rank`` measures under DDP (as :func:`split` gives it): nothing on rank 0 (the
    writer) when there are other ranks, part ``rank - 1`` of ``world - 1`` on the others."""
    if world == 1:
        return split(sizes, 0, 1)
    return [] if rank == 0 else split(sizes, rank - 1, world - 1)


class PendingReduction:
    """Under DDP and FSDP2, one row per step: ``[loss, this rank's part's values]`` (the part's
    values: whether it had a gradient, its three squared norms, its partial sketch), the rows of
    ``every`` steps summed over the ranks in one all_reduce, started without waiting
    (``async_op``) once that many steps are queued and finished at the next step.

    Collectives of a group run in order, so by the time the next step's gradient all-reduce is
    done this one is too, and no rank ever waits for it. An extra collective per step cost ~7% of
    a small CNN's DDP step (gloo, 2 CPU processes), hence the batches; a row of ~1,000 values
    costs no more to send than one of 2. The cost: the values of step t become known up to
    ``2 * every - 1`` steps later, when the recorder finishes one reduction just before it
    starts the next (at the latest at ``finish(flush=True)``, which every rank calls at close)."""

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

    @property
    def queued(self) -> int:
        return len(self._queued)

    def clear(self) -> None:
        """Forget the queued steps and the result of the reduction in flight (every rank stopped
        at the same step)."""
        self._queued = []
        if self._pending is not None:
            self._pending[2].wait()
            self._pending = None

    def start(self, parts: Tensor) -> None:
        """Start the reduction of the queued steps, with this rank's values ``parts`` (n, w) of
        them, in order (n = the queued steps)."""
        import torch.distributed as dist

        rows = self._queued
        if parts.shape[0] != len(rows):
            raise RuntimeError(f"{parts.shape[0]} rows of values for {len(rows)} queued steps")
        self._queued = []
        losses = torch.tensor([[0.0 if loss is None else loss] for _, loss in rows], dtype=parts.dtype)
        vec = torch.cat([losses.to(parts.device), parts], dim=1).to(self.layout.device)
        work = dist.all_reduce(vec, group=self.layout.group, async_op=True)
        self._pending = (rows, vec, work)

    def finish(self, flush: bool = False, parts: Tensor | None = None) -> tuple[list[int], list[float | None], Tensor]:
        """(steps, losses averaged over ranks (None where this rank had none), (n, w) values
        summed over ranks) of the reduction in flight (and, with ``flush``, of the queued steps
        too, reduced now with this rank's ``parts`` of them), in step order."""
        if flush and self._queued:
            steps, losses, sums = self.finish()
            self.start(parts)
            more = self.finish()
            return (steps + more[0], losses + more[1], torch.cat([sums, more[2]]) if steps else more[2])
        if self._pending is None:
            return [], [], torch.zeros(0, 0)
        rows, vec, work = self._pending
        self._pending = None
        work.wait()
        vec = vec.cpu()
        totals = vec[:, 0].tolist()
        return ([step for step, _ in rows],
                [None if loss is None else total / self.layout.world for (_, loss), total in zip(rows, totals)],
                vec[:, 1:])
