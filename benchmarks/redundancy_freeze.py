"""Redundancy freeze: wall time of the frozen phase against full training, and the final metric gap.

Usage: python benchmarks/redundancy_freeze.py [--workloads mnist1d-cnn cifar10-resnet20] [--seeds 0 1 2]
           [--threshold 0.005] [--window 50] [--patience 3] [--last-layer] [--frozen-ops dense|native]
           [--threads 1] [--json] [--out PATH]

Per workload and seed, in one process: a model trains with the workload's config (SGD + momentum,
warmup-cosine, the Trainer's batches: ``BatchSampler`` and ``schedule_factor``) in a plain loop
with a ``FreezeController`` (``trajscope.controllers.freeze``, default criterion: displacement-MDS
ratio to the random-walk baseline <= ``--threshold`` on ``--patience`` consecutive decisions every
10 steps, window ``--window``; kept set: the normalization scales and shifts, plus the last layer
with ``--last-layer``; frozen convolutions on small feature maps as dense operators unless
``--frozen-ops native``, :mod:`trajscope.controllers.frozen_ops`). At the switch step K the run forks: a copy of the model and optimizer state,
unfrozen, continues *full* training, while the original continues *frozen*; the two train steps
K+1..T in lockstep on the same batches and rates, alternating which goes first at every step so
that load from other processes hits both alike. Timed per step: forward, loss, backward,
optimizer step, zero_grad (the controller's own watching cost before K is reported separately).
If the criterion has not fired by ``--fallback`` x T (default 0.75), the fork is there and the row says so.

Reported per workload (mean over seeds, and per seed): ``time_saving`` = 1 - t_frozen / t_full over
steps K+1..T (a fraction, wall time); ``cpu_time_saving``, the same on this process's CPU time
(``time.process_time``: with one thread, the time the steps take without waiting for other
processes; on a loaded machine the waiting is added to both sides, and where it does not grow with
a step's own work it pulls the wall-time ratio towards 1); ``cpu_ms_per_step``, the CPU time of a
step's forward (with the loss), backward, optimizer step and zero_grad on each side;
``run_saving``, the wall-time saving over the whole run (prefix included, the watcher's cost
charged to the frozen run); ``metric_gap`` = 100 * (val accuracy full - frozen) at T (points;
positive: freezing lost accuracy); the switch step and the kept/total parameter counts.
Targets (issue 6): time_saving >= 0.25 and metric_gap <= 0.5.

Workloads: ``mnist1d-cnn`` at its defaults (2,000 steps, batch 128); ``cifar10-resnet20`` on the
SYNTHETIC CIFAR-format stand-in (``synthetic=true``: the real CIFAR-10 batches are not on this
machine), shortened to ``--resnet-steps`` (default 720: 4.6 epochs of the 5,000-image stand-in) at
batch ``--resnet-batch`` (default 32). The criterion is the same for both workloads; its ratio falls
as the cosine rate decays, so it fires later in a shorter run: at 240 steps it fired only at step 220
(0.92 T, past the fallback), at 720 steps at 440-470 (0.61-0.65 T). Both workloads take 15-35
minutes on a 2-core CPU, depending on its load. JSON also goes to
benchmarks/results/redundancy_freeze.json (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from trajscope import workloads
from trajscope.config import RunConfig
from trajscope.controllers import LoopHooks
from trajscope.controllers.freeze import FreezeController
from trajscope.controllers.frozen_ops import MODES as FROZEN_OPS_MODES, dense_modules, remove_frozen_ops
from trajscope.train import Trainer
from trajscope.train.optim import copy_optimizer, make_optimizer, schedule_factor
from trajscope.train.trainer import BatchSampler

WORKLOADS = ("mnist1d-cnn", "cifar10-resnet20")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "redundancy_freeze.json"
TIMED = ("per step: forward, loss, backward, optimizer.step, zero_grad; the frozen and full copies "
         "train steps K+1..T in lockstep, alternating which goes first")


def config_for(name: str, args) -> RunConfig:
    if name == "cifar10-resnet20":
        return RunConfig.for_workload(name, workload_options={"synthetic": True}, steps=args.resnet_steps,
                                      batch_size=args.resnet_batch)
    return RunConfig.for_workload(name)


PHASES = ("forward", "backward", "step", "zero_grad")  # CPU time of each, the lr writes counted in forward


def train_step(model, opt, wl, x, y, lr: float) -> tuple[float, float, tuple[float, ...]]:
    """One timed step: (wall seconds, CPU seconds of this process, CPU seconds of each of PHASES)."""
    t0, c = time.perf_counter(), [time.process_time()]
    for g in opt.param_groups:
        g["lr"] = lr
    loss = wl.loss_fn(model(x), y)
    c.append(time.process_time())
    loss.backward()
    c.append(time.process_time())
    opt.step()
    c.append(time.process_time())
    opt.zero_grad(set_to_none=True)
    c.append(time.process_time())
    wall = time.perf_counter() - t0
    return wall, c[-1] - c[0], tuple(b - a for a, b in zip(c, c[1:]))


def fork_full(model, opt, cfg):
    """The full copy at the switch: the same weights, unfrozen, on the plain modules (no frozen
    operator, no wrapper check), with its own copy of the optimizer state (``copy_optimizer``:
    ``load_state_dict`` alone would share the momentum tensors between the two sides)."""
    full = copy.deepcopy(model)
    remove_frozen_ops(full)
    for p in full.parameters():
        p.requires_grad_(True)
    return full, copy_optimizer(opt, full, cfg)


def one_seed(name: str, seed: int, args, bar) -> dict:
    cfg = config_for(name, args)
    wl = workloads.get(name)
    data = wl.make_data(seed, cfg.workload_options)
    torch.manual_seed(seed)
    model = wl.make_model(cfg.workload_options)
    opt = make_optimizer(model, cfg)
    sampler = BatchSampler(len(data.x_train), cfg.batch_size, seed)
    ctl = FreezeController(window=args.window, threshold=args.threshold, patience=args.patience,
                           last_layer=args.last_layer, frozen_ops=args.frozen_ops)
    hooks = LoopHooks([ctl], model, opt)
    t_watch = time.perf_counter()
    hooks.start()
    t_watch = time.perf_counter() - t_watch
    t_prefix, K, fallback = 0.0, None, round(args.fallback * cfg.steps)
    batch = lambda s: (data.x_train[sampler.indices(s)], data.y_train[sampler.indices(s)])  # noqa: E731
    for step in range(1, cfg.steps + 1):
        x, y = batch(step)
        t_prefix += train_step(model, opt, wl, x, y, cfg.lr * schedule_factor(cfg, step))[0]
        t0 = time.perf_counter()
        hooks.ctx.step, hooks.ctx.values = step, {}
        ctl.on_step_end(hooks.ctx)  # the watcher's cost, charged to the frozen run
        t_watch += time.perf_counter() - t0
        bar.update(1)
        if ctl.state.switched or step == fallback:
            K = step
            break
    switched_by = ctl.state.switch_reason if ctl.state.switched else "fallback"
    full, full_opt = fork_full(model, opt, cfg)
    if not ctl.state.switched:
        ctl.switch_now(hooks.ctx, "fallback: the criterion did not fire")
    timed = {"frozen": [0.0, 0.0], "full": [0.0, 0.0]}  # [wall, cpu] seconds over steps K+1..T
    phases = {"frozen": [0.0] * len(PHASES), "full": [0.0] * len(PHASES)}
    for step in range(K + 1, cfg.steps + 1):
        x, y = batch(step)
        lr = cfg.lr * schedule_factor(cfg, step)
        order = ((model, opt, "frozen"), (full, full_opt, "full"))
        for m, o, which in (order if step % 2 else order[::-1]):
            wall, cpu, parts = train_step(m, o, wl, x, y, lr)
            timed[which][0] += wall
            timed[which][1] += cpu
            phases[which] = [a + b for a, b in zip(phases[which], parts)]
        bar.update(1)
    n_after = max(cfg.steps - K, 1)
    phase_ms = {w: {p: 1e3 * t / n_after for p, t in zip(PHASES, ts)} for w, ts in phases.items()}
    (t_frozen, c_frozen), (t_full, c_full) = timed["frozen"], timed["full"]
    ev = Trainer(cfg, progress=False)
    acc_frozen = ev.evaluate(model, data)["val_metric"]
    acc_full = ev.evaluate(full, data)["val_metric"]
    s = ctl.state
    return {"seed": seed, "switch_step": K, "switched_by": switched_by, "steps": cfg.steps,
            "kept_params": s.kept_params, "total_params": s.total_params, "dense_modules": dense_modules(model),
            "t_prefix_s": t_prefix, "t_watch_s": t_watch, "t_frozen_s": t_frozen, "t_full_s": t_full,
            "t_frozen_cpu_s": c_frozen, "t_full_cpu_s": c_full, "cpu_ms_per_step": phase_ms,
            "time_saving": 1.0 - t_frozen / t_full if t_full > 0 else 0.0,
            "cpu_time_saving": 1.0 - c_frozen / c_full if c_full > 0 else 0.0,
            "run_saving": 1.0 - (t_prefix + t_watch + t_frozen) / (t_prefix + t_full),
            "val_metric_full": acc_full, "val_metric_frozen": acc_frozen,
            "metric_gap": 100.0 * (acc_full - acc_frozen)}


def summarize(name: str, rows: list[dict], args) -> dict:
    mean = lambda k: statistics.fmean(r[k] for r in rows)  # noqa: E731
    out = {"workload": name, "seeds": [r["seed"] for r in rows], "steps": rows[0]["steps"],
           "data": "synthetic CIFAR-format stand-in (synthetic=true)" if name == "cifar10-resnet20" else "generated",
           "time_saving": mean("time_saving"), "cpu_time_saving": mean("cpu_time_saving"), "run_saving": mean("run_saving"), "metric_gap": mean("metric_gap"),
           "switch_steps": [r["switch_step"] for r in rows], "switched_by": [r["switched_by"] for r in rows],
           "kept_params": rows[0]["kept_params"], "total_params": rows[0]["total_params"],
           "cpu_ms_per_step": {w: {ph: statistics.fmean(r["cpu_ms_per_step"][w][ph] for r in rows) for ph in PHASES}
                               for w in ("frozen", "full")},
           "per_seed": rows}
    out["meets_target"] = bool(out["time_saving"] >= 0.25 and out["metric_gap"] <= 0.5)
    return out


def assemble(rows: dict[str, list[dict]], args) -> dict:
    result = {"benchmark": "redundancy_freeze", "timed": TIMED, "threads": args.threads,
              "kept": "normalization scales and shifts" + (" + last layer" if args.last_layer else ""),
              "frozen_ops": args.frozen_ops,
              "criterion": {"threshold": args.threshold, "window": args.window, "patience": args.patience,
                            "every": 10},
              "workloads": [summarize(n, r, args) for n, r in rows.items()]}
    result["time_saving"] = {w["workload"]: w["time_saving"] for w in result["workloads"]}
    result["metric_gap"] = {w["workload"]: w["metric_gap"] for w in result["workloads"]}
    return result


def print_table(result: dict, file=sys.stdout) -> None:
    print(f"redundancy freeze (kept: {result['kept']}; {result['timed']})", file=file)
    head = (f"{'workload':<18}{'steps':>6}{'switch':>18}{'kept/total':>16}{'time_saving':>13}{'cpu_saving':>12}"
            f"{'run_saving':>12}{'gap (pts)':>11}")
    print(head, file=file)
    for w in result["workloads"]:
        sw = ",".join(str(s) for s in w["switch_steps"])
        print(f"{w['workload']:<18}{w['steps']:>6}{sw:>18}{w['kept_params']:>7}/{w['total_params']:<8}"
              f"{w['time_saving']:>13.3f}{w['cpu_time_saving']:>12.3f}{w['run_saving']:>12.3f}{w['metric_gap']:>11.2f}",
              file=file)
        for which, ms in w["cpu_ms_per_step"].items():
            print(f"  CPU ms per step, {which:>6}: " + ", ".join(f"{ph} {t:.2f}" for ph, t in ms.items())
                  + f" (total {sum(ms.values()):.2f})", file=file)
        for r in w["per_seed"]:
            print(f"  seed {r['seed']}: switch {r['switch_step']} ({r['switched_by']}), frozen {r['t_frozen_s']:.1f}s vs "
                  f"full {r['t_full_s']:.1f}s wall ({r['t_frozen_cpu_s']:.1f}s vs {r['t_full_cpu_s']:.1f}s CPU), acc full {r['val_metric_full']:.4f} frozen {r['val_metric_frozen']:.4f}",
                  file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threshold", type=float, default=0.005)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--last-layer", action="store_true", help="keep the last layer trainable too")
    ap.add_argument("--frozen-ops", choices=FROZEN_OPS_MODES, default="dense",
                    help="the frozen convolutions' dense path (trajscope.controllers.frozen_ops)")
    ap.add_argument("--fallback", type=float, default=0.75, help="fork here (fraction of T) if the criterion has not fired by then")
    ap.add_argument("--resnet-steps", type=int, default=720)
    ap.add_argument("--resnet-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    total = sum(config_for(n, args).steps for n in args.workloads) * len(args.seeds)
    rows: dict[str, list[dict]] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=total, desc="redundancy freeze", unit="step", leave=False) as bar:
        for name in args.workloads:
            for seed in args.seeds:
                rows.setdefault(name, []).append(one_seed(name, seed, args, bar))
                result = assemble(rows, args)
                args.out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a kill
    print_table(result, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
