"""A 51 x 51 filter-normalized loss plane: trajscope against loss-landscapes' ``random_plane``.

Usage: .venv-ll/bin/python benchmarks/landscape.py [--json] [--repeats 5] [--threads 1] [--steps 51]
[--warmup 20] [--chunk 8] [--clock cpu|wall] [--stat best|median] [--workloads mnist1d-mlp mnist1d-cnn]
(a venv with trajscope and the peer: ``python3 -m venv .venv-ll; .venv-ll/bin/pip install torch==2.13.0;
.venv-ll/bin/pip install -e . loss-landscapes==3.0.6``; torch first, so pip keeps the CPU build).
Writes benchmarks/results/landscape.json.

Set-up per workload (mnist1d-mlp, mnist1d-cnn): the model from ``make_model`` (seed 0) after
``--warmup`` (default 20) SGD steps (the workload's lr and momentum, batch 128; the peer's filter
normalization divides by zero on a 1-D tensor that is all zeros, as BatchNorm's bias is at init),
the first 1,000 training examples as one batch, cross-entropy (mean over the batch), the model in
train mode for everyone (BatchNorm on the batch's statistics; ours updates no buffer, the peer's
deep copy does, which does not change its outputs).

Same directions, same points. ``random_plane`` draws its directions inside (uniform [0, 1] entries,
the second made orthogonal to the first, its own filter normalization -- 1-D tensors element by
element -- then both scaled to |theta| / (distance * steps)) and cannot take given ones. So we seed
torch's generator, call it, and rebuild exactly the same two directions with its own functions
(``rand_u_like``, ``orthogonal_to``, ``filter_normalize_``) from the same seed. Its grid starts at
theta - (steps / 2)(d1 + d2) and walks by in-place additions; row i is alpha = i - steps/2, and its
snake walk puts column j at beta = j + 1 - steps/2 on even rows and j - steps/2 on odd rows. We hand
exactly those 2,601 coefficient pairs and the two directions to ``trajscope.landscape.
evaluate_points``. ``max_abs_diff`` is the largest loss difference over the points (the peer's
in-place walk accumulates float32 rounding over the whole plane; ours steps in place within a row
but recomputes a point directly every 16 points, see ``trajscope.landscape.loop``).

Timed in the same process, in a fresh random order each repeat: ``bound``, steps^2 plain ``model(x)``
forward passes under no_grad (what both tools cannot beat); ``ours`` (strategy "auto": it times a
vmapped chunk against a per-point loop and runs the faster; the loop replays the first layer,
which reads the data, from precomputed outputs, so it can beat the bound); ``ours_vmap`` and
``ours_loop`` (each strategy forced); ``peer`` (``random_plane`` with ``deepcopy_model=True``, including its direction
draws, a few ms). ``bound_ratio`` = ours / bound, ``speedup`` = peer / ours, from the best (minimum)
time over repeats by default (``--stat median`` for medians; both are in ``figures``): on a shared
machine interference only adds time, so the minimum is the least disturbed run.
Clock: ``--clock cpu`` (default) times the process's CPU time (user + system, so page faults count),
which with one thread is the work done and is not inflated by other processes competing for the
cores of a shared machine; wall-clock figures are in ``figures["wall"]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import torch

from trajscope import workloads
from trajscope.landscape import evaluate_points

WORKLOADS = ("mnist1d-mlp", "mnist1d-cnn")
RESULTS = Path(__file__).parent / "results"


def setup(name: str, warmup: int, n: int = 1000):
    """(model in train mode after ``warmup`` SGD steps from seed 0, loss, the first n examples)."""
    wl = workloads.get(name)
    data = wl.make_data(0, {})
    torch.manual_seed(0)
    model = wl.make_model({}).train()
    opt = torch.optim.SGD(model.parameters(), lr=wl.defaults["lr"], momentum=wl.defaults["momentum"])
    g = torch.Generator().manual_seed(0)
    for _ in range(warmup):
        idx = torch.randint(0, len(data.x_train), (128,), generator=g)
        opt.zero_grad()
        wl.loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, wl.loss_fn, (data.x_train[:n], data.y_train[:n])


def peer_directions(model, seed: int, steps: int, distance: float):
    """The two directions ``random_plane`` draws for ``seed`` (its own code, on a deep copy), as
    {name: tensor}, and the plane's coefficients (steps^2, 2) in its output order."""
    from loss_landscapes.model_interface.model_parameters import orthogonal_to, rand_u_like
    from loss_landscapes.model_interface.model_wrapper import wrap_model

    torch.manual_seed(seed)
    start = wrap_model(copy.deepcopy(model)).get_module_parameters()
    d1 = rand_u_like(start)
    d2 = orthogonal_to(d1)
    for d in (d1, d2):
        d.filter_normalize_(start)
        d.mul_(((start.model_norm() / distance) / steps) / d.model_norm())
    names = [n for n, _ in model.named_parameters()]
    dirs = [{n: t.detach().clone() for n, t in zip(names, d.parameters)} for d in (d1, d2)]
    half = steps / 2
    coeffs = torch.tensor([[i - half, j + (1 if i % 2 == 0 else 0) - half] for i in range(steps)
                           for j in range(steps)], dtype=torch.float64)
    return dirs, coeffs


def run_peer(model, loss_fn, batch, seed: int, steps: int, distance: float) -> torch.Tensor:
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    torch.manual_seed(seed)
    out = loss_landscapes.random_plane(model, Loss(loss_fn, *batch), distance=distance, steps=steps,
                                       normalization="filter", deepcopy_model=True)
    return torch.as_tensor(out, dtype=torch.float64).reshape(-1)


@torch.no_grad()
def run_bound(model, batch, n: int) -> None:
    x = batch[0]
    for _ in range(n):
        model(x)


def bench(name: str, repeats: int, steps: int, seed: int, distance: float, chunk: int, warmup: int,
          clock: str = "cpu", stat: str = "best") -> dict:
    model, loss_fn, batch = setup(name, warmup)
    dirs, coeffs = peer_directions(model, seed, steps, distance)
    origin = {n: p.detach().clone() for n, p in model.named_parameters()}
    results: dict = {}
    stats: dict = {}

    def ours(strategy):
        return lambda: evaluate_points(model, loss_fn, batch, origin, dirs, coeffs, chunk_size=chunk,
                                       strategy=strategy, stats=stats if strategy == "auto" else None)[0]

    jobs = {"bound": lambda: run_bound(model, batch, steps * steps), "ours": ours("auto"),
            "ours_vmap": ours("vmap"), "ours_loop": ours("loop"),
            "peer": lambda: run_peer(model, loss_fn, batch, seed, steps, distance)}
    times: dict[str, dict[str, list[float]]] = {"cpu": {k: [] for k in jobs}, "wall": {k: [] for k in jobs}}
    rng = random.Random(seed)
    for _ in range(repeats):
        for key in rng.sample(list(jobs), len(jobs)):  # a fresh random order each repeat
            w0, c0 = time.perf_counter(), time.process_time()
            value = jobs[key]()
            times["cpu"][key].append(time.process_time() - c0)
            times["wall"][key].append(time.perf_counter() - w0)
            if key != "bound":
                results[key] = value
    diffs = {k: float((results[k] - results["peer"]).abs().max()) for k in ("ours", "ours_vmap", "ours_loop")}
    figures = {c: {s: _figures(times[c], f) for s, f in (("best", min), ("median", statistics.median))}
               for c in times}
    head = figures[clock][stat]
    return {"params": sum(p.numel() for p in model.parameters()), "points": len(coeffs), "batch": len(batch[0]),
            "bound_ratio": head["bound_ratio"], "speedup": head["speedup"], "max_abs_diff": diffs["ours"],
            "max_abs_diff_vmap": diffs["ours_vmap"], "max_abs_diff_loop": diffs["ours_loop"],
            "auto_strategy": stats.get("strategy"), "loss_range": [float(results["peer"].min()),
                                                                    float(results["peer"].max())],
            "figures": figures, "times": times}


def _figures(times: dict[str, list[float]], stat) -> dict[str, float]:
    """Seconds per job (``stat`` over repeats) and the ratios."""
    t = {k: stat(v) for k, v in times.items()}
    return {**{f"{k}_s": v for k, v in t.items()}, "bound_ratio": t["ours"] / t["bound"],
            "bound_ratio_vmap": t["ours_vmap"] / t["bound"], "bound_ratio_loop": t["ours_loop"] / t["bound"],
            "peer_bound_ratio": t["peer"] / t["bound"], "speedup": t["peer"] / t["ours"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=51)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distance", type=float, default=1.0, help="random_plane's distance")
    ap.add_argument("--chunk", type=int, default=8, help="points per vmapped chunk")
    ap.add_argument("--warmup", type=int, default=20, help="SGD steps before measuring")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="the clock of the headline figures")
    ap.add_argument("--stat", choices=("best", "median"), default="best",
                    help="the statistic over repeats of the headline figures")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats, "steps": args.steps,
           "chunk": args.chunk, "warmup_steps": args.warmup, "clock": args.clock, "stat": args.stat,
           "models": {}}
    try:
        import loss_landscapes  # noqa: F401
    except ImportError as e:
        out["error"] = f"loss-landscapes not installed: {e}"
    for name in args.workloads if "error" not in out else []:
        out["models"][name] = bench(name, args.repeats, args.steps, args.seed, args.distance, args.chunk,
                                   args.warmup, args.clock, args.stat)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "landscape.json").write_text(json.dumps(out, indent=2))
    if args.json:
        print(json.dumps(out))
        return
    print(f"torch {out['torch']}, {args.threads} thread(s), {args.steps}x{args.steps} points, batch 1000, "
          f"{args.stat} of {args.repeats}, {args.clock} seconds")
    print(f"{'model':<12} {'bound s':>8} {'ours s':>8} {'vmap s':>8} {'loop s':>8} {'peer s':>8} "
          f"{'ours/bound':>10} {'speedup':>8} {'max|diff|':>10} auto")
    for name, r in out["models"].items():
        f = r["figures"][args.clock][args.stat]
        print(f"{name:<12} {f['bound_s']:8.2f} {f['ours_s']:8.2f} {f['ours_vmap_s']:8.2f} {f['ours_loop_s']:8.2f} "
              f"{f['peer_s']:8.2f} {r['bound_ratio']:10.3f} {r['speedup']:8.2f} {r['max_abs_diff']:10.2e} "
              f"{r['auto_strategy']}")
    if "error" in out:
        print(out["error"])


if __name__ == "__main__":
    main()
