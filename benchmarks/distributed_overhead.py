"""Wall-time overhead of trajscope's default Recorder in a 2-process DDP run (gloo, CPU).

Usage: python benchmarks/distributed_overhead.py [--steps 300] [--repeats 5] [--world 2]
           [--workload mnist1d-cnn] [--threads 1] [--json] [--out PATH]

Two processes (torch.multiprocessing spawn, gloo) each train two DistributedDataParallel copies of
the workload's model in lockstep, as benchmarks/recording_overhead.py does in one process: a
*plain* loop and a *recorded* one (the same plus ``rec.step(loss=loss, optimizer=opt)``; rank 0
passes ``Run.create(...)``, the other ranks ``run=None``; Recorder defaults), alternating which goes
first at every step. Each rank takes its 1/world of the global batch (the workload's batch size).
Timed on rank 0 (the ranks wait for each other in every gradient all-reduce): per step, plus
``Run.create`` + ``Recorder(...)`` and ``rec.close()`` for the recorded copy. Reported: the median
over repeats of recorded / plain. The JSON also goes to benchmarks/results/distributed_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording_overhead import Setup  # noqa: E402  (the same data, config and batches)

import trajscope  # noqa: E402
from trajscope.train.optim import make_optimizer  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "distributed_overhead.json"


class Copy:
    """One DDP copy of the model; ``recorded`` adds the Recorder (rank 0 writes)."""

    def __init__(self, s: Setup, rank: int, recorded: bool, root: Path, tag: str):
        torch.manual_seed(s.seed)
        self.s, self.rank, self.recorded, self.root, self.tag = s, rank, recorded, root, tag
        self.model = torch.nn.parallel.DistributedDataParallel(s.wl.make_model({}).train())
        self.opt = make_optimizer(self.model, s.cfg)

    def open(self):
        if self.recorded:
            run = None
            if self.rank == 0:
                run = trajscope.Run.create(self.root, {"bench": "distributed_overhead", "tag": self.tag}, seed=0)
            self.rec = trajscope.Recorder(self.model, run)

    def step(self, x, y):
        self.opt.zero_grad()
        loss = self.s.wl.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()
        if self.recorded:
            self.rec.step(loss=loss, optimizer=self.opt)

    def close(self):
        if self.recorded:
            self.rec.close()


def lockstep(s: Setup, rank: int, world: int, root: Path, tag: str, steps: int) -> dict[str, float]:
    """Seconds spent by each copy (recorded: with open and close), order rotating each step."""
    copies = {"plain": Copy(s, rank, False, root, tag), "recorded": Copy(s, rank, True, root, tag)}
    spent = {n: 0.0 for n in copies}
    for n, c in copies.items():
        t0 = time.perf_counter()
        c.open()
        spent[n] += time.perf_counter() - t0
    names = list(copies)
    for i, idx in enumerate(s.batches[:steps]):
        part = idx[rank::world]  # this rank's share of the global batch
        x, y = s.data.x_train[part], s.data.y_train[part]
        for n in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            copies[n].step(x, y)
            spent[n] += time.perf_counter() - t0
    for n, c in copies.items():
        t0 = time.perf_counter()
        c.close()
        spent[n] += time.perf_counter() - t0
    return spent


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s = Setup(args.workload, args.steps, args.seed)
        root = Path(tempfile.mkdtemp(prefix="trajscope-dist-bench-")) if rank == 0 else None
        lockstep(s, rank, world, root, "warmup", max(1, args.warmup_steps))
        rows = []
        for r in range(args.repeats):
            spent = lockstep(s, rank, world, root, f"repeat-{r}", args.steps)
            rows.append({"plain_s": spent["plain"], "recorded_s": spent["recorded"],
                         "ratio": spent["recorded"] / spent["plain"]})
            if rank == 0:
                print(f"repeat {r}: ratio {rows[-1]['ratio']:.3f}", file=sys.stderr, flush=True)
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--workload", default="mnist1d-cnn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.world < 1:
        ap.error("--steps, --repeats and --world must be >= 1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = str(Path(tmp, "rows.json"))
        mp.spawn(worker, args=(args.world, port, args, rows_file), nprocs=args.world, join=True)
        rows = json.loads(Path(rows_file).read_text())
    ratios = [r["ratio"] for r in rows]
    result = {
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "workload": args.workload, "world": args.world, "backend": "gloo", "steps": args.steps,
        "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
        "timed_region": "rank 0: recorded copy's Run.create + Recorder() + steps + close; plain copy's steps; "
                        "the two DDP copies train in lockstep, order alternating each step",
        "details": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    file = sys.stderr if args.json else sys.stdout
    print(f"{args.world}-process DDP (gloo), {args.workload}, {args.steps} steps x {args.repeats} repeats, "
          f"torch {torch.__version__}, {args.threads} thread(s) per process", file=file)
    print(f"{'repeat':>6} {'plain s':>9} {'recorded s':>11} {'ratio':>7}", file=file)
    for i, r in enumerate(rows):
        print(f"{i:>6} {r['plain_s']:>9.3f} {r['recorded_s']:>11.3f} {r['ratio']:>7.3f}", file=file)
    print(f"median ratio {result['ratio']:.3f} (range {result['ratio_min']:.3f}-{result['ratio_max']:.3f})", file=file)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
