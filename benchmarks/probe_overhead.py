"""Time overhead of SharpnessProbe every 16 steps (and of Cockpit's "full" preset as a peer).

Usage: python benchmarks/probe_overhead.py [--json] [--steps 160] [--repeats 5] [--threads 1]
       [--workloads mnist1d-cnn mnist1d-mlp] [--every 16] [--clock cpu|wall]
       [--at step_end|after_backward|both] [--interleave step|run]
Clock: process CPU time by default (with one thread, the work done, not inflated by other processes
on a shared machine; as in ``hessian.py``), ``--clock wall`` for wall time.
Run it with a venv that has cockpit-for-pytorch for the peer (``.venv-bench``); without it the
peer entry is ``{"error": ...}``.

Per workload: the model from ``make_model`` (seed 0), SGD with the workload's lr and momentum
(constant rate), batch 128, the same pre-drawn batches for every run; a plain loop (zero_grad,
forward, backward, step). "plain" is that loop, "probed" the same loop that calls
``SharpnessProbe(every=16)`` at its defaults (tol = value_tol = 1e-2, warm start from the previous
vector, finite-difference products with the ReLU kinks frozen (``method="auto"``), train mode, the
step's batch) through its event handler at the end of the steps its schedule fires, writing its
scalars into a real run (a temporary store; the final commit of the buffered rows is timed too).
Interleaving is step by step: within a repeat, the plain and the probed runs advance in lockstep,
each step of every run timed on its own and the order of the runs rotating from step to step, so
that the load of other processes on a shared machine falls on both alike (running whole runs one
after the other let the per-repeat ratio swing by +-20%); ratio = median over repeats of probed
time / plain time. The probed run must end with bit-identical parameters and buffers (the probe has
no side effect), which is checked.

``--at``: the probe at STEP_END (its default, ``ratio``) and/or ``SharpnessProbe(at="after_backward")``,
called between backward and the optimizer step with the step's loss in ``ctx.loss``, reusing the
step's gradient as the base of its differences (measured at theta_{step-1}); with ``both`` (the
default) the three runs (plain and the two probed) advance in lockstep together and the second
one's figures are under ``after_backward``.

``every_for_ratio_1.3``: the probe interval at which the measured cost per measurement would make the
ratio 1.3 (cost per measurement / (0.3 * plain time per step)).

Accuracy: one more (untimed) probed run compares every probe value with a tight reference on the
same batch and parameters (Lanczos by double backward to relative residual 1e-6): median and max
relative error, in the JSON next to ``ratio`` (``accuracy``) and per workload.

Peer: Cockpit (BackPACK-extended model and loss) with ``configuration("full",
track_schedule=linear(16))`` on the same batches; ratio = its time / plain time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from trajscope import workloads
from trajscope.events import Event, StepContext
from trajscope.functional.hessian import top_hessian_eigenvalues
from trajscope.probes.sharpness import SharpnessProbe
from trajscope.store import Run

RESULTS = Path(__file__).parent / "results"
CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCK["cpu"]


class Setup:
    def __init__(self, name: str, steps: int, batch_size: int = 128):
        self.name, self.wl = name, workloads.get(name)
        self.data = self.wl.make_data(0, {})
        g = torch.Generator().manual_seed(0)
        idx = [torch.randint(0, len(self.data.x_train), (batch_size,), generator=g) for _ in range(steps)]
        self.batches = [(self.data.x_train[i], self.data.y_train[i]) for i in idx]

    def model(self, wrap=lambda m: m):
        torch.manual_seed(0)
        model = wrap(self.wl.make_model({}))
        d = self.wl.defaults
        return model, torch.optim.SGD(model.parameters(), lr=d["lr"], momentum=d["momentum"])


def train(s: Setup, probe: SharpnessProbe | None = None, on_probe=None):
    """(seconds, model, probe outputs) of one plain (or probed) run over ``s.batches``; the probe
    runs at its event (after the optimizer step, or between backward and step for
    ``at="after_backward"``, with the step's loss in ``ctx.loss`` and its gradient in ``p.grad``)."""
    model, opt = s.model()
    ctx = StepContext(config=None, run=None, model=model, optimizer=opt, workload=s.wl, data=s.data)
    outputs = []

    def measure(step, x, y, loss):
        if probe is not None and probe.schedule(step):
            ctx.step, ctx.batch, ctx.loss = step, (x, y), loss
            outputs.append(probe(ctx))
            if on_probe is not None:
                on_probe(model, (x, y), outputs[-1])
    early = probe is not None and probe.at == "after_backward"
    t0 = clock()
    for step, (x, y) in enumerate(s.batches, start=1):
        opt.zero_grad(set_to_none=True)
        loss = s.wl.loss_fn(model(x), y)
        loss.backward()
        if early:
            measure(step, x, y, loss)
        opt.step()
        if not early:
            measure(step, x, y, None)
    return clock() - t0, model, outputs


class Runner:
    """One run of the lockstep: a fresh model and optimizer, and (probed) a probe writing to a run."""

    def __init__(self, s: Setup, probe: SharpnessProbe | None, root: Path | None):
        self.s, self.probe, self.seconds = s, probe, 0.0
        self.model, self.opt = s.model()
        self.run = None if probe is None else Run.create(root, config={"probe": probe.at}, seed=0)
        self.ctx = StepContext(config=None, run=self.run, model=self.model, optimizer=self.opt,
                               workload=s.wl, data=s.data)

    def step(self, step: int, x, y) -> None:
        t0 = clock()
        ctx, probe = self.ctx, self.probe
        ctx.step, ctx.values = step, {}
        self.opt.zero_grad(set_to_none=True)
        loss = self.s.wl.loss_fn(self.model(x), y)
        loss.backward()
        if probe is not None:
            ctx.batch, ctx.loss = (x, y), loss
            probe.on_event(Event.AFTER_BACKWARD, ctx)  # a no-op unless the probe runs there
        self.opt.step()
        if probe is not None:
            ctx.loss = None
            probe.on_event(Event.STEP_END, ctx)
        self.seconds += clock() - t0

    def finish(self) -> None:
        if self.run is not None:
            t0 = clock()
            self.run.commit()  # the buffered scalar rows
            self.seconds += clock() - t0
            self.run.close()


def lockstep(s: Setup, probes: list[SharpnessProbe | None], root: Path) -> list[Runner]:
    """The runs of ``probes`` (None: plain) advanced together step by step, the order rotating."""
    runners = [Runner(s, p, root / str(i)) for i, p in enumerate(probes)]
    n = len(runners)
    for step, (x, y) in enumerate(s.batches, start=1):
        for i in range(n):
            runners[(step + i) % n].step(step, x, y)
    for r in runners:
        r.finish()
    return runners


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def accuracy(s: Setup, every: int, at: str = "step_end") -> dict:
    errs = []

    def check(model, batch, out):
        ref = top_hessian_eigenvalues(model, s.wl.loss_fn, batch, tol=1e-6, max_iter=300,
                                      method="double-backward").values[0]
        errs.append(abs(out["lambda_max"] - float(ref)) / abs(float(ref)))

    _, _, outs = train(s, SharpnessProbe(every=every, at=at), on_probe=check)
    return {"median_rel_err": statistics.median(errs), "max_rel_err": max(errs),
            "mean_iterations": statistics.fmean(o["iterations"] for o in outs),
            "max_residual": max(o["residual"] for o in outs), "measurements": len(outs)}


def cockpit_step_time(s: Setup, every: int) -> float:
    """Seconds for Cockpit "full" (every ``every`` steps) over ``s.batches``."""
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.utils import schedules
    from cockpit.utils.configuration import configuration

    model, opt = s.model(wrap=extend)
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    individual = torch.nn.CrossEntropyLoss(reduction="none")
    cockpit = Cockpit(model.parameters(), quantities=configuration("full", track_schedule=schedules.linear(every)))
    t0 = clock()
    for step, (x, y) in enumerate(s.batches):
        opt.zero_grad()
        out = model(x)
        loss = loss_fn(out, y)
        info = {"batch_size": len(x), "individual_losses": individual(out, y).detach(), "loss": loss,
                "optimizer": opt}
        with cockpit(step, info=info):
            loss.backward(create_graph=cockpit.create_graph(step))
        opt.step()
    return clock() - t0


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def bench(name: str, args) -> tuple[dict, dict]:
    s = Setup(name, args.steps)
    ats = ("step_end", "after_backward") if args.at == "both" else (args.at,)
    kinds = (None, *ats)
    make = lambda at: None if at is None else SharpnessProbe(every=args.every, at=at)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        lockstep(s, [make(at) for at in kinds], Path(tmp) / "warmup")  # allocator, imports
        times: dict = {k: [] for k in kinds}
        same = True
        for r in range(args.repeats):
            if args.interleave == "step":
                runners = lockstep(s, [make(at) for at in kinds], Path(tmp) / str(r))
                for at, runner in zip(kinds, runners):
                    times[at].append((runner.seconds, runner.model))
            else:  # whole runs one after the other, the order rotating (no scalar writes)
                for at in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                    t, model, _ = train(s, make(at))
                    times[at].append((t, model))
            same &= all(same_state(times[None][-1][1], times[at][-1][1]) for at in ats)
    n_meas = sum(make("step_end").schedule(t) for t in range(1, args.steps + 1))
    t_plain = statistics.median(t for t, _ in times[None])
    per = {}
    for at in ats:
        ratios = [tp / tq for (tp, _), (tq, _) in zip(times[at], times[None])]
        t_probed = statistics.median(t for t, _ in times[at])
        per_measurement = (t_probed - t_plain) / n_meas  # seconds
        per[at] = {"ratio": statistics.median(ratios), "ratios": ratios,
                   "measurement_s": per_measurement,
                   "every_for_ratio_1.3": per_measurement / (0.3 * t_plain / args.steps),
                   "probed_s": t_probed, "accuracy": accuracy(s, args.every, at)}
    result = {**per[ats[0]], "at": ats[0], "same_trajectory": same, "step_s": t_plain / args.steps,
              "plain_s": t_plain}
    if len(ats) > 1:
        result[ats[1]] = per[ats[1]]
    try:
        import backpack  # noqa: F401
        import cockpit  # noqa: F401
    except Exception as e:
        return result, {"error": f"cockpit-for-pytorch not installed: {one_line(e)}"}
    warnings.filterwarnings("ignore", module=r"(backpack|cockpit)(\.|$)")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        c = [cockpit_step_time(s, args.every) for _ in range(max(1, args.repeats // 2))]
    except Exception as e:  # BackPACK cannot handle the model (e.g. BatchNorm in train mode)
        return result, {"error": one_line(e)}
    return result, {"ratio": statistics.median(c) / result["plain_s"], "seconds": c}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--every", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workloads", nargs="+", default=["mnist1d-cnn", "mnist1d-mlp"])
    ap.add_argument("--at", choices=("step_end", "after_backward", "both"), default="both",
                    help="the probe's event; both: 'ratio' is step_end's, the other under 'after_backward'")
    ap.add_argument("--interleave", choices=("step", "run"), default="step",
                    help="step: the runs advance in lockstep (default); run: whole runs in turn (the "
                         "protocol before 2026-12-02, probe called directly, no scalar writes)")
    ap.add_argument("--clock", choices=tuple(CLOCK), default="cpu",
                    help="process CPU time (default; not inflated by other processes on a shared machine) or wall")
    args = ap.parse_args()
    global clock
    clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    per, peers = {}, {}
    for name in args.workloads:
        per[name], peers[name] = bench(name, args)
    first = args.workloads[0]
    out = {"ratio": per[first]["ratio"], "accuracy": per[first]["accuracy"], "workload": first, "per_workload": per,
           "peers": {"cockpit-full": peers[first], "cockpit-full-per_workload": peers},
           "steps": args.steps, "every": args.every, "repeats": args.repeats, "threads": args.threads,
           "clock": args.clock, "interleave": args.interleave,
           "torch": torch.__version__, "probe": "SharpnessProbe(every=16) defaults: tol=value_tol=1e-2, method=auto (finite differences)"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "probe_overhead.json").write_text(json.dumps(out, indent=2))
    if args.json:
        print(json.dumps(out))
        return
    print(f"torch {out['torch']}, {args.threads} thread(s), {args.steps} steps, probe every {args.every}")
    print(f"{'workload':<13} {'plain s':>8} {'probed s':>9} {'ratio':>6} {'med err':>8} {'max err':>8} "
          f"{'iters':>6} {'cockpit-full':>14}")
    for name, r in per.items():
        a, c = r["accuracy"], peers[name]
        ck = f"{c['ratio']:.2f}" if "ratio" in c else "error"
        print(f"{name:<13} {r['plain_s']:8.3f} {r['probed_s']:9.3f} {r['ratio']:6.2f} {a['median_rel_err']:8.1e} "
              f"{a['max_rel_err']:8.1e} {a['mean_iterations']:6.1f} {ck:>14}")
    for name, c in peers.items():
        if "error" in c:
            print(f"cockpit-full on {name}: {c['error']}")


if __name__ == "__main__":
    main()
