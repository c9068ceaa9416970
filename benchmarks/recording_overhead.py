"""Wall-time overhead of trajscope's default Recorder (and of Cockpit "economy" as a peer).

Usage: python benchmarks/recording_overhead.py [--steps 300] [--repeats 5] [--cockpit-steps 50]
           [--workloads mnist1d-cnn modadd-transformer] [--threads 1] [--json] [--out PATH]

Per workload and repeat, in one process, two copies of the model (same seed, data and batches)
train in lockstep: a *plain* loop (zero_grad, forward, loss, backward, optimizer.step) and a
*recorded* one (the same plus ``rec.step(loss=loss, optimizer=opt)``, ``trajscope.Recorder``'s
defaults), alternating which goes first at every step, so load from other processes hits both
alike. Timed: per step, plus ``Run.create`` + ``Recorder(...)`` and ``rec.close()`` for the
recorded one; not timed: data generation, model/optimizer construction. Optimizer, lr and batch
size are the workload's defaults (constant lr). Reported: median over repeats of recorded / plain.

Peer: Cockpit (``cockpit-for-pytorch``; BackPACK-extended model and loss; preset "economy") as a
third copy in the same lockstep for the first ``--cockpit-steps`` steps; its ratio is its time per
step (incl. ``Cockpit(...)``) over the plain copy's time per step on those same steps. Needs
``pip install -e '.[bench]'``; without it, or where BackPACK cannot handle the model, ``peers``
holds ``{"error": ...}``. The JSON also goes to benchmarks/results/recording_overhead.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

import trajscope
from trajscope import workloads
from trajscope.config import RunConfig
from trajscope.train.optim import make_optimizer
from trajscope.train.trainer import BatchSampler

WORKLOADS = ("mnist1d-cnn", "modadd-transformer")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "recording_overhead.json"
TIMED = ("recorded: Run.create + Recorder() + its training steps + rec.close(); plain: its training "
         "steps; the two train in lockstep; data generation and model/optimizer construction excluded")
NOT_INSTALLED = "cockpit-for-pytorch not installed (pip install -e '.[bench]')"


def cockpit_missing() -> str | None:
    try:
        with warnings.catch_warnings():  # cockpit imports pkg_resources (deprecated)
            warnings.simplefilter("ignore")
            import backpack  # noqa: F401
            import cockpit  # noqa: F401
    except Exception as e:  # ImportError, or no pkg_resources under setuptools>=81
        return f"{NOT_INSTALLED}: {type(e).__name__}: {e}"
    return None


class Setup:
    """One workload: data, a config with the workload's defaults, the batch indices of each step."""

    def __init__(self, name: str, steps: int, seed: int):
        self.name, self.seed, self.wl = name, seed, workloads.get(name)
        self.data = self.wl.make_data(seed, {})
        self.cfg = RunConfig(workload=name, seed=seed, **{**self.wl.defaults, "steps": steps,
                                                          "schedule": "constant"})
        sampler = BatchSampler(len(self.data.x_train), self.cfg.batch_size, seed)
        self.batches = [sampler.indices(t) for t in range(1, steps + 1)]

    def model(self, wrap=None):
        torch.manual_seed(self.seed)
        model = self.wl.make_model({})
        model = wrap(model) if wrap else model
        return model.train(), make_optimizer(model, self.cfg)


class Plain:
    """One copy of the model; ``open``, ``step`` and ``close`` are timed, ``__init__`` is not."""

    def __init__(self, s: Setup):
        self.s, (self.model, self.opt) = s, s.model()

    def open(self):  # timed set-up
        pass

    def step(self, x, y):
        self.opt.zero_grad()
        loss = self.s.wl.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss

    close = open  # timed tear-down


class Recorded(Plain):
    def __init__(self, s: Setup, root: Path, tag: str):
        super().__init__(s)
        self.config = {"bench": "recording_overhead", "workload": s.name, "tag": tag}
        self.root = root

    def open(self):
        self.rec = trajscope.Recorder(self.model, trajscope.Run.create(self.root, self.config, seed=self.s.seed))

    def step(self, x, y):
        loss = super().step(x, y)
        self.rec.step(loss=loss, optimizer=self.opt)
        return loss

    def close(self):
        self.rec.close()


class CockpitEconomy(Plain):
    def __init__(self, s: Setup):
        from backpack import extend

        if s.wl.loss != "cross_entropy":
            raise NotImplementedError(f"benchmark wires Cockpit for cross-entropy only, not {s.wl.loss}")
        self.s, (self.model, self.opt) = s, s.model(wrap=extend)
        self.loss_fn = extend(torch.nn.CrossEntropyLoss())
        self.individual_loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
        self.global_step = 0
        warnings.filterwarnings("ignore", module=r"(backpack|cockpit)(\.|$)")  # BatchNorm, "no extension"
        warnings.filterwarnings("ignore", message="Full backward hook is firing")

    def open(self):
        from cockpit import Cockpit
        from cockpit.utils.configuration import configuration

        self.cockpit = Cockpit(self.model.parameters(), quantities=configuration("economy"))

    def step(self, x, y):
        self.opt.zero_grad()
        out = self.model(x)
        loss = self.loss_fn(out, y)
        losses = self.individual_loss_fn(out, y).detach()
        info = {"batch_size": len(x), "individual_losses": losses, "loss": loss, "optimizer": self.opt}
        with self.cockpit(self.global_step, info=info):
            loss.backward(create_graph=self.cockpit.create_graph(self.global_step))
        self.opt.step()
        self.global_step += 1
        return loss


def lockstep(s: Setup, runners: dict, steps: dict) -> tuple[dict, dict, dict]:
    """Train ``runners`` step by step, rotating their order each step; runner n stops after
    ``steps[n]`` steps. Returns (time of open+close, per-step times, last loss) per runner."""
    names, fixed, per_step, losses = list(runners), {}, {n: [] for n in runners}, {}
    for n in names:
        t0 = time.perf_counter()
        runners[n].open()
        fixed[n] = time.perf_counter() - t0
    for i, idx in enumerate(s.batches[:max(steps.values())]):
        x, y = s.data.x_train[idx], s.data.y_train[idx]
        for n in names[i % len(names):] + names[:i % len(names)]:
            if i < steps[n]:
                t0 = time.perf_counter()
                losses[n] = runners[n].step(x, y)
                per_step[n].append(time.perf_counter() - t0)
    for n in names:
        t0 = time.perf_counter()
        runners[n].close()
        fixed[n] += time.perf_counter() - t0
    return fixed, per_step, {n: float(v.detach()) for n, v in losses.items()}


def cockpit_error(s: Setup, e: BaseException) -> str:
    """One line: the exception, and the parameters BackPACK cannot see (owned by custom modules)."""
    msg = (str(e).strip().splitlines() or [""])[0][:300]
    bare = [f"{m}.{n}".lstrip(".") for m, mod in s.wl.make_model({}).named_modules()
            for n, _ in mod.named_parameters(recurse=False) if not type(mod).__module__.startswith("torch.nn")]
    why = f" (BackPACK has no per-sample gradient for parameters of custom modules: {', '.join(bare)})"
    return f"{type(e).__name__}: {msg}" + (why if bare else "")


def median(xs):
    return statistics.median(xs) if xs else None


def bench(s: Setup, args, root: Path, peer: dict, tag: str, steps: int) -> tuple[dict, dict, dict]:
    """One lockstep repeat of plain, recorded and (where it runs) Cockpit."""
    runners = {"plain": Plain(s), "recorded": Recorded(s, root, tag)}
    n_steps = {"plain": steps, "recorded": steps}
    if peer.get(s.name) is None and "error" not in peer:
        try:
            runners["cockpit"] = CockpitEconomy(s)
            n_steps["cockpit"] = min(args.cockpit_steps, steps)
        except Exception as e:
            peer[s.name] = {"error": cockpit_error(s, e)}
    try:
        return lockstep(s, runners, n_steps)
    except Exception as e:  # BackPACK/Cockpit could not handle this model: retry without it
        if "cockpit" not in runners:
            raise
        peer[s.name] = {"error": cockpit_error(s, e)}
        return bench(s, args, root, peer, tag + "-retry", steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cockpit-steps", type=int, default=50, help="Cockpit steps per repeat (0: skip)")
    ap.add_argument("--warmup-steps", type=int, default=10, help="untimed lockstep steps per workload")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); 1 is "
                    "steadier on a shared machine (2 threads showed 40x stalls on a loaded 2-core box)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.cockpit_steps < 0:
        ap.error("--steps and --repeats must be >= 1, --cockpit-steps >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    setups = [Setup(n, args.steps, args.seed) for n in args.workloads]
    missing = cockpit_missing() if args.cockpit_steps > 0 else "skipped (--cockpit-steps 0)"
    peer: dict = {"error": missing} if missing else {}
    details = {s.name: {k: [] for k in ("plain_s", "recorded_s", "ratio", "plain_step_ms", "recorded_step_ms",
                                        "cockpit_step_ms", "plain_step_ms_same_steps", "cockpit_ratio")}
               for s in setups}
    root = Path(tempfile.mkdtemp(prefix="trajscope-bench-"))
    try:
        for s in setups:  # untimed warm-up (first calls, imports); also finds where Cockpit fails
            bench(s, args, root, peer, "warmup", max(1, args.warmup_steps))
            details[s.name]["same_final_loss"] = True
        bar = tqdm(total=args.repeats * len(setups), desc="recording_overhead", unit="repeat", file=sys.stderr)
        for r in range(args.repeats):
            for s in setups:
                d = details[s.name]
                fixed, per_step, loss = bench(s, args, root, peer, f"repeat-{r}", args.steps)
                tp, tr = sum(per_step["plain"]), fixed["recorded"] + sum(per_step["recorded"])
                for key, v in (("plain_s", tp), ("recorded_s", tr), ("ratio", tr / tp),
                               ("plain_step_ms", 1e3 * median(per_step["plain"])),
                               ("recorded_step_ms", 1e3 * median(per_step["recorded"]))):
                    d[key].append(v)
                d["same_final_loss"] &= loss["plain"] == loss["recorded"]
                if "cockpit" in per_step:
                    k = len(per_step["cockpit"])
                    tc, tpk = (fixed["cockpit"] + sum(per_step["cockpit"])) / k, sum(per_step["plain"][:k]) / k
                    for key, v in (("cockpit_step_ms", 1e3 * tc), ("plain_step_ms_same_steps", 1e3 * tpk),
                                   ("cockpit_ratio", tc / tpk)):
                        d[key].append(v)
                bar.update(1)
                bar.set_postfix(workload=s.name, ratio=f"{tr / tp:.3f}")
        bar.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    for name, d in details.items():
        d.update(plain_median_s=median(d["plain_s"]), recorded_median_s=median(d["recorded_s"]),
                 ratio_median=median(d["ratio"]))
    if "error" not in peer:
        peer = {n: peer.get(n) or median(details[n]["cockpit_ratio"]) for n in details}
    result = {
        "ratio": {n: d["ratio_median"] for n, d in details.items()},
        "peers": {"cockpit-economy": peer},
        "steps": args.steps, "repeats": args.repeats, "cockpit_steps": args.cockpit_steps,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "timed_region": TIMED,
        "cockpit_note": (f"Cockpit trains only the first {args.cockpit_steps} steps of each repeat; its ratio "
                         "is its time per step over the plain copy's time per step on those steps"),
        "details": details,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


def print_table(res: dict, file) -> None:
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p(f"torch {res['torch']}, {res['threads']} thread(s), {res['steps']} steps x {res['repeats']} repeats")
    p(f"timed: {res['timed_region']}")
    p(f"{'workload':<20} {'plain s':>9} {'recorded s':>11} {'ratio':>7}  cockpit-economy ratio")
    peer = res["peers"]["cockpit-economy"]
    for name, d in res["details"].items():
        c = peer.get(name, peer if "error" in peer else None)
        c = f"{c:.1f}x" if isinstance(c, float) else (c or {}).get("error", "-")
        p(f"{name:<20} {d['plain_median_s']:>9.3f} {d['recorded_median_s']:>11.3f} {d['ratio_median']:>7.3f}  {c}")
    p("ratio: median over repeats of recorded/plain (lockstep, same seed/data/batches)")
    if "error" not in peer:
        p(f"cockpit: {res['cockpit_note']}")


if __name__ == "__main__":
    sys.exit(main())
