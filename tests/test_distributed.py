"""Recording under torch.distributed: 2 processes (gloo, CPU, torch.multiprocessing, forked) record
the same trajectory as one process with the same global batch, under DDP and under FSDP2."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import trajscope
from trajscope.errors import DivergedError, UsageError
from trajscope.record import distributed as D

STEPS, GLOBAL_BATCH, WORLD = 6, 16, 2


def _model() -> nn.Module:
    # Uneven dim-0 splits over 2 ranks: 7 rows -> 4 + 3, and the 1-row head -> 1 + 0 (an empty shard).
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 1))


def _batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(GLOBAL_BATCH, 10, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2]


def _train(model, rec, rank: int = 0, world: int = 1, nan_at: int | None = None) -> None:
    """SGD with momentum, MSE (mean over the rank's part of the global batch)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    per = GLOBAL_BATCH // world
    for t in range(1, STEPS + 1):
        x, y = _batch(t)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        rec.step(loss=loss * float("nan") if t == nan_at else loss, optimizer=opt)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, root: str) -> None:
    """Both layouts in one pair of processes (starting one costs seconds of imports)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for mode in ("ddp", "fsdp"):
            _record_both_ways(rank, mode, root)
    finally:
        dist.destroy_process_group()


def _wrapped(mode: str) -> nn.Module:
    model = _model()
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def _record_both_ways(rank: int, mode: str, root: str) -> None:
    """Record the run of ``mode`` ("ddp" or "fsdp") with reduce_every 8 (the default: every
    step's values are reduced at close), 2 (reductions started at steps 1, 3 and 5, the one
    before finished as the next starts) and 3 with per-tensor state (``flat_max=0``: each step
    processed at once, its values waiting for the reduction), try bad set-ups, then a NaN on
    rank 1 only; what each rank saw goes to checks-<mode>-<rank>.json."""
    checks = {"layout": None, "errors": []}
    for every in (8, 2, 3):
        model = _wrapped(mode)
        gathers = []
        full = D.full
        D.full = lambda t: gathers.append(1) or full(t)  # count the collectives that gather snapshots
        run = trajscope.Run.create(root, {"mode": mode, "every": every}, seed=0) if rank == 0 else None
        try:
            rec = trajscope.Recorder(model, run, snapshots=trajscope.schedules.at([0, 2, 5]), reduce_every=every,
                                     flat_max=0 if every == 3 else 1 << 22)
            checks["layout"] = rec.layout.mode
            if every == 8:  # the elements this rank measures
                checks["measured"] = 0 if rec._state is None else rec._state.numel
            _train(model, rec, rank, WORLD)
            rec.close()
        finally:
            D.full = full
        checks[f"gathers-{every}"] = len(gathers)
    # Bad set-ups: one line each, before anything is written.
    for bad_run in ([None] if rank == 0 else [trajscope.Run.create(root, {"bad": rank, "mode": mode})]):
        try:
            trajscope.Recorder(model, bad_run)
        except UsageError as e:
            checks["errors"].append(str(e))
    if mode == "fsdp" and rank == 0:
        try:
            trajscope.Recorder(model, trajscope.Run.create(root, {"ck": 1}), checkpoints=trajscope.schedules.at([3]))
        except UsageError as e:
            checks["errors"].append(str(e))
    # A NaN loss on rank 1 alone: both ranks stop at the same step, rank 0 marks the run. The
    # values of steps 2-3 travel in one reduction (0-1, 2-3, 4-5 with reduce_every=2), finished
    # when the next one starts, at step 5: rank 0 records steps 4 and 5, and drops them.
    model = _wrapped(mode)
    run = trajscope.Run.create(root, {"mode": mode, "nan": True}, seed=0) if rank == 0 else None
    rec = trajscope.Recorder(model, run, reduce_every=2)
    try:
        _train(model, rec, rank, WORLD, nan_at=3 if rank == 1 else None)
    except DivergedError as e:
        checks["diverged_at"] = e.step
        checks["nan_steps_run"] = rec.current_step
    Path(root, f"checks-{mode}-{rank}.json").write_text(json.dumps(checks))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run with the same global batch."""
    root = tmp_path_factory.mktemp("single")
    model = _model()
    run = trajscope.Run.create(root, {"mode": "single"}, seed=0)
    with trajscope.Recorder(model, run, snapshots=trajscope.schedules.at([0, 2, 5])) as rec:
        _train(model, rec)
    return trajscope.Run.open(run.path)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    # fork: the workers start from this interpreter (no re-import of torch: 38 s -> a few s); a
    # deadline turns a stuck worker into a failure instead of a hung suite.
    ctx = mp.start_processes(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("the 2 forked workers did not finish within 300 s")
    return root


def _find(root: Path, **config) -> trajscope.Run:
    for p in root.iterdir():
        if p.is_dir() and trajscope.Run.open(p).config == config:
            return trajscope.Run.open(p)
    raise AssertionError(f"no run with config {config}")


@pytest.mark.parametrize("every", [8, 2, 3])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_record_the_single_process_trajectory(mode, every, reference, spawned):
    checks = [json.loads(Path(spawned, f"checks-{mode}-{r}.json").read_text()) for r in range(WORLD)]
    assert [c["layout"] for c in checks] == [{"ddp": "replicated", "fsdp": "sharded"}[mode]] * WORLD
    # DDP: rank 0 writes and rank 1 measures the whole vector; FSDP2: each rank its shards
    # (rows 4 + 3 of the 7 x 10 weight and 7 biases, 1 + 0 of the head's weight and bias)
    total = sum(p.numel() for p in _model().parameters())
    assert [c["measured"] for c in checks] == ([0, total] if mode == "ddp" else [40 + 4 + 7 + 1, 30 + 3])
    run = _find(spawned, mode=mode, every=every)
    assert run.status == "finished"
    got, want = run.scalars(wide=True), reference.scalars(wide=True)
    assert list(got.index) == list(range(STEPS + 1)) and set(got.columns) == set(want.columns)
    # float32 sums in another order (gradient all-reduce, sharded norms): a few ulps
    for name in want.columns:
        torch.testing.assert_close(torch.tensor(got[name].values), torch.tensor(want[name].values),
                                   rtol=2e-5, atol=1e-7, equal_nan=True, msg=name)
    (s1, k1), (s2, k2) = run.sketches(), reference.sketches()
    assert list(s1) == list(s2) == list(range(STEPS + 1))
    torch.testing.assert_close(k1, k2, rtol=1e-5, atol=2e-6)
    assert run.snapshot_steps() == reference.snapshot_steps() == [0, 2, 5]
    for step in (0, 2, 5):
        a, b = run.load_snapshot(step), reference.load_snapshot(step)
        assert set(a) == set(b) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        for n in b:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    # FSDP2 gathers full tensors only on the snapshot schedule (4 tensors x 3 steps), on every rank.
    assert [c[f"gathers-{every}"] for c in checks] == ([0, 0] if mode == "ddp" else [12, 12])
    # Bad set-ups are refused with one line.
    assert "needs a run" in checks[0]["errors"][0] and "pass run=None" in checks[1]["errors"][0]
    if mode == "fsdp":
        assert "torch.distributed.checkpoint" in checks[0]["errors"][1]
    assert all("\n" not in e for c in checks for e in c["errors"])
    # A NaN on one rank stops both at that step; rank 0's run says so and keeps the steps before.
    assert [c.get("diverged_at") for c in checks] == [3, 3]
    nan_run = _find(spawned, mode=mode, nan=True)
    assert nan_run.status == "diverged" and nan_run.meta["status_step"] == 3
    assert sorted(set(nan_run.scalars()["step"])) == [0, 1, 2, 3]
    assert max(nan_run.sketches()[0]) <= 3 and max(nan_run.snapshot_steps()) <= 3  # nothing after it
    assert [c["nan_steps_run"] for c in checks] == [5, 5]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_measured_parts_cover_every_element_once(world):
    sizes = [7, 0, 70, 1, 3]
    seen = []
    for rank in range(world):
        part = D.measured_part(sizes, rank, world)
        if world > 1 and rank == 0:
            assert part == []  # the writer measures nothing
        for j, a, b in part:
            assert 0 <= a < b <= sizes[j]
            seen += [(j, i) for i in range(a, b)]
    assert seen == [(j, i) for j, n in enumerate(sizes) for i in range(n)]  # in order, once each
    # contiguous, and as even as whole elements allow
    counts = [sum(b - a for _, a, b in D.measured_part(sizes, r, world)) for r in range(world)][world > 1:]
    assert max(counts) - min(counts) <= 1
