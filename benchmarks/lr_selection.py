"""Choosing the learning rate: trajscope's methods against a 5-trial grid, the range test, Prodigy
and schedule-free AdamW, in one process, same budgets, same batches.

Usage: .venv/bin/python benchmarks/lr_selection.py [--quick] [--json] [--workloads ...] [--threads 1]
       [--root DIR] [--confirm-seeds N] [--studies N]

Per workload (budgets in BUDGETS, shortened from the workloads' defaults so that the whole run fits
a shared 2-core machine; the workload's own schedule, batch size and target) and per optimizer
(SGD with momentum 0.9, AdamW with the workload's weight decay):

- ``grid``: 5 trials at Halton (base 2) points of a log-uniform range (GRID_RANGE), AlgoPerf's
  external tuning: the best trial (final validation metric) counts; its compute is all 5 runs,
  its steps to target the best trial's own (as AlgoPerf scores it) plus ``grid_steps_to_target_all``
  (the 4 other trials' budgets added, what the search really spent before its answer);
- ``range-test``, ``curvature``, ``early-race``: :func:`trajscope.select_lr` (compute = choosing +
  the final run, in step-equivalents: optimizer steps plus 2 x HVP examples / batch size plus
  forward-only evaluation examples / (3 x batch size), the race's rung evaluations);
- ``prodigy`` (lr 1.0, the workload's schedule) and ``schedulefree`` (schedule-free AdamW, lr
  0.0025, constant rate): at their defaults, once per workload (no optimizer choice to make).

Steps to target: compute spent until the final run first evaluates at or above the workload's
target (evaluated every budget/20 steps; None if never). Summary per trajscope method (curvature,
early-race): ``compute_ratio`` = mean over (workload, optimizer) of total compute / budget;
``within`` = (workload, optimizer) pairs whose final metric is within 0.5 points of the grid's best
for that optimizer; ``workloads_within_target`` = workloads where that holds for both optimizers;
``beats_lr_free`` = workloads where its fewest steps to target (over the two optimizers) is below
both Prodigy's and schedule-free's; ``grid_best_beats_lr_free`` = the same count for the grid's
best trial with no choosing cost (its own steps): a reference for how many workloads a free pick
could win at all. The summary's top-level keys are those of the best trajscope method (most
workloads within target, then least compute).

Wall times (``wall_s``) are the seconds the runs took when they were trained, read from the stored
runs (a grid's is the sum of its 5 trials; a trajscope method's is choosing plus its final run, the
race's losers and winner summed over their resumes), so a rerun on a ``--root`` that already holds
them (``reused``: true) reports the first run's seconds; range-test and curvature choosing is
always recomputed (it is not stored).

``--confirm-seeds N`` (opt-in) removes the winner's bias of the grid's single-seed maximum: per
(workload, optimizer) it reruns the grid's best rate and each trajscope method's chosen rate as plain
runs on N fresh seeds (seed + 1 .. seed + N: new data draw where the workload generates its data, new
init and batch order; a run that does not finish counts as 0) and reports their finals and means
(``confirm``) and, in ``summary.confirm_seeds``, ``within_pairs`` and ``workloads_within_target`` of
each method on the means (within 0.5 points of the grid rate's mean). The existing summary keys are
computed as without the flag.

``--studies N`` (opt-in, default 1) is AlgoPerf's own answer to the same noise: N independent
studies, each the whole benchmark (grid, every method, Prodigy, schedule-free) on its own seed (study
k: the config's seed + k, so new data draw, init, batch order, and the methods' own probes and races)
with the grid on its own 5 points (the Halton points rotated by k x the golden ratio, mod 1); the
score of each method is the median over studies (of the grid's best trial's final, of a method's
final, of steps to target). Study 0 is the benchmark's own run: ``rows`` and the summary's top-level
keys are unchanged; the other studies' rows are in ``study_rows`` and the medians in
``summary.studies`` (``within_pairs``, ``workloads_within_target``, ``beats_lr_free``,
``compute_ratio``, per pair in ``pairs``). Unlike ``--confirm-seeds``, which reruns seed 0's chosen
rates, a study reruns the choosing too, so it measures the method rather than one pick.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

BUDGETS = {"mnist1d-mlp": 800, "mnist1d-cnn": 400, "digits-mlp": 500, "mnist5k-cnn": 300, "modadd-mlp": 150}
QUICK = {"digits-mlp": 200, "mnist1d-mlp": 200}
GRID_RANGE = {"sgd": (1e-3, 3.0), "adamw": (1e-4, 1e-1)}
TRAJSCOPE = ("curvature", "early-race")
RESULTS = Path(__file__).parent / "results"


def halton2(n: int) -> list[float]:
    """The first n points of the base-2 van der Corput (1-D Halton) sequence: 1/2, 1/4, 3/4, 1/8, ..."""
    out = []
    for i in range(1, n + 1):
        f, x, k = 0.5, 0.0, i
        while k:
            x += f * (k & 1)
            k >>= 1
            f /= 2
        out.append(x)
    return out


GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def grid_rates(optimizer: str, n: int = 5, study: int = 0) -> list[float]:
    """The grid's n log-uniform rates: Halton points for study 0 (the benchmark's own grid), shifted
    by ``study`` x the golden ratio (mod 1, a Cranley-Patterson rotation) for every further study,
    so that independent studies draw different, equally spread trial points."""
    lo, hi = GRID_RANGE[optimizer]
    shift = (study * GOLDEN) % 1.0
    return [lo * (hi / lo) ** ((u + shift) % 1.0) for u in halton2(n)]


def steps_to_target(path: str, target: float) -> int | None:
    """The first evaluated step whose val_metric >= target, or None."""
    from trajscope.store import Run

    run = Run.open(path)
    try:
        df = run.scalars(["val_metric"], wide=True)
    finally:
        run.close()
    hits = df.index[df["val_metric"] >= target]
    return int(hits[0]) if len(hits) else None


def row(method, optimizer, lr, summary, choose, target, budget, extra=None):
    final = (summary.get("final") or {}).get("val_metric", float("nan"))
    if summary.get("status") != "finished":
        final = float("nan")
    hit = steps_to_target(summary["path"], target) if summary.get("path") else None
    train = int(summary.get("steps") or 0)
    out = {"method": method, "optimizer": optimizer, "lr": lr, "status": summary.get("status"),
           "final_metric": final, "choose_steps": choose, "total_steps": choose + train,
           "wall_s": float(summary.get("wall_s") or 0.0), "steps_to_target": None if hit is None else choose + hit,
           "reused": bool(summary.get("cached"))}
    out.update(extra or {})
    return out


def base(workload: str, optimizer: str, budget: int):
    from trajscope.config import RecordConfig, RunConfig

    return RunConfig.for_workload(workload, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0,
                                  steps=budget, eval_every=max(budget // 20, 1), record=RecordConfig.preset("minimal"))


def bench_workload(workload: str, budget: int, root: str, say, study: int = 0) -> list[dict]:
    """Every method on one workload. ``study`` k > 0 is an independent repeat: every run on seed
    (the config's seed + k: data draw, init, batch order, the methods' own probes) and the grid on
    its rotated points (:func:`grid_rates`); study 0 is the benchmark's own run."""
    from trajscope import select_lr, workloads
    from trajscope.errors import TrajscopeError
    from trajscope.sweep import run_configs

    target = workloads.get(workload).target
    rows = []
    for opt in ("sgd", "adamw"):
        cfg = base(workload, opt, budget)
        if study:
            cfg = cfg.model_copy(update={"seed": cfg.seed + study})
        rates = grid_rates(opt, study=study)
        trials = run_configs([cfg.model_copy(update={"lr": lr}) for lr in rates], root=root, progress=False)
        finals = [(t.get("final") or {}).get("val_metric", -1.0) if t.get("status") == "finished" else -1.0
                  for t in trials]
        b = max(range(len(trials)), key=lambda i: finals[i])
        r = row("grid", opt, rates[b], trials[b], 0, target, budget,
                {"trials": [{"lr": lr, "final_metric": f} for lr, f in zip(rates, finals)]})
        r["total_steps"] = sum(int(t.get("steps") or 0) for t in trials)
        r["wall_s"] = sum(float(t.get("wall_s") or 0.0) for t in trials)
        r["reused"] = any(t.get("cached") for t in trials)
        r["grid_steps_to_target_all"] = None if r["steps_to_target"] is None else \
            r["steps_to_target"] + r["total_steps"] - int(trials[b].get("steps") or 0)
        rows.append(r)
        say(r)
        for method in ("range-test",) + TRAJSCOPE:
            t0 = time.perf_counter()
            try:
                sel = select_lr(cfg, method, root=root, progress=False)
            except TrajscopeError as e:  # the method could not choose: a result, reported as such
                r = {"method": method, "optimizer": opt, "lr": float("nan"), "status": "failed", "error": str(e),
                     "final_metric": float("nan"), "choose_steps": float("nan"), "total_steps": float("nan"),
                     "wall_s": time.perf_counter() - t0, "steps_to_target": None}
                rows.append(r)
                say(r)
                continue
            ch = sel.choose.step_equivalents
            r = row(method, opt, sel.lr, sel.run, round(ch, 1), target, budget,
                    {"choose_wall_s": sel.choose.wall_s, "reason": sel.reason})
            r["wall_s"] = sel.total_wall_s
            rows.append(r)
            say(r)
    for name, lr, schedule in (("prodigy", 1.0, None), ("schedulefree", 0.0025, "constant")):
        cfg = base(workload, "adamw", budget).model_copy(update={"optimizer": name, "lr": lr})
        if study:
            cfg = cfg.model_copy(update={"seed": cfg.seed + study})
        if schedule:
            cfg = cfg.model_copy(update={"schedule": schedule, "warmup_steps": 0})
        s = run_configs([cfg], root=root, progress=False)[0]
        r = row(name, name, lr, s, 0, target, budget)
        rows.append(r)
        say(r)
    return rows


def summarize(rows: list[dict], budgets: dict[str, int]) -> dict:
    out = {}
    for m in TRAJSCOPE:
        ratios, within_pairs, within_wl, beats = [], 0, 0, 0
        for wl, budget in budgets.items():
            mine = [r for r in rows if r["workload"] == wl and r["method"] == m]
            ok = []
            for r in mine:
                g = next(x for x in rows if x["workload"] == wl and x["method"] == "grid" and x["optimizer"] == r["optimizer"])
                if math.isfinite(r["total_steps"]):
                    ratios.append(r["total_steps"] / budget)
                good = math.isfinite(r["final_metric"]) and r["final_metric"] >= g["final_metric"] - 0.005
                ok.append(good)
                within_pairs += good
            within_wl += bool(ok) and all(ok)
            inf = float("inf")
            best = min((r["steps_to_target"] or inf) for r in mine) if mine else inf
            free = [(r["steps_to_target"] or inf) for r in rows if r["workload"] == wl and r["method"] in ("prodigy", "schedulefree")]
            beats += best < inf and all(best < f for f in free)
        out[m] = {"compute_ratio": sum(ratios) / max(len(ratios), 1), "within_pairs": within_pairs,
                  "pairs": sum(r["method"] == m for r in rows), "failed": sum(r["method"] == m and
                                                                      r.get("status") == "failed" for r in rows), "workloads_within_target": within_wl, "beats_lr_free": beats,
                  "workloads": len(budgets)}
    best = max(TRAJSCOPE, key=lambda m: (out[m]["workloads_within_target"], -out[m]["compute_ratio"]))
    return {"best_method": best, "compute_ratio": out[best]["compute_ratio"],
            "workloads_within_target": out[best]["workloads_within_target"], "methods": out,
            "grid_best_beats_lr_free": _oracle_beats(rows, budgets),
            "targets": {"compute_ratio": 1.5, "workloads_within_target": 4, "metric_gap_points": 0.5}}


def _oracle_beats(rows: list[dict], budgets: dict[str, int]) -> int:
    """Workloads where the grid's best trial, its choosing cost left out (its own steps to target,
    the faster of the two optimizers), reaches the target in fewer steps than both Prodigy and
    schedule-free: what a free pick among the grid's rates would score on ``beats_lr_free``."""
    inf, n = float("inf"), 0
    for wl in budgets:
        own = [r["steps_to_target"] or inf for r in rows if r["workload"] == wl and r["method"] == "grid"]
        free = [r["steps_to_target"] or inf for r in rows if r["workload"] == wl and r["method"] in ("prodigy", "schedulefree")]
        n += bool(own) and min(own) < inf and all(min(own) < f for f in free)
    return n


def median(xs: list[float]) -> float:
    """The median (the mean of the middle two for an even count); inf counts as a value (never)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summarize_studies(studies: list[list[dict]], budgets: dict[str, int]) -> dict:
    """AlgoPerf's external-tuning score over independent studies: per (workload, method, optimizer)
    one row of medians over the studies (the final, a failed or unfinished run counting as 0; steps
    to target, never counting as inf) and the mean total compute, scored by :func:`summarize` as a
    single study is (``within_pairs``, ``workloads_within_target``, ``beats_lr_free``,
    ``compute_ratio``, ``grid_best_beats_lr_free``); ``pairs`` lists each pair's per-study finals."""
    inf = float("inf")
    groups: dict[tuple, list[dict]] = {}
    for rows in studies:
        for r in rows:
            groups.setdefault((r["workload"], r["method"], r["optimizer"]), []).append(r)
    med, stats = [], {}
    for (wl, m, opt), got in groups.items():
        finals = [r["final_metric"] if math.isfinite(r["final_metric"]) else 0.0 for r in got]
        tt = median([inf if r["steps_to_target"] is None else r["steps_to_target"] for r in got])
        totals = [r["total_steps"] for r in got if math.isfinite(r["total_steps"])]
        stats[wl, m, opt] = {"finals": finals, "median": median(finals), "lrs": [r["lr"] for r in got],
                             "steps_to_target": tt}
        med.append({"workload": wl, "method": m, "optimizer": opt, "status": "finished", "final_metric": median(finals),
                    "steps_to_target": None if tt == inf else tt,
                    "total_steps": sum(totals) / len(totals) if totals else float("nan")})
    scored = summarize(med, budgets)
    methods = {m: {k: scored["methods"][m][k] for k in ("within_pairs", "workloads_within_target", "beats_lr_free",
                                                           "compute_ratio")} for m in TRAJSCOPE}
    pairs = []
    for wl in budgets:
        for opt in ("sgd", "adamw"):
            entry = {"workload": wl, "optimizer": opt, **{m: stats[wl, m, opt] for m in ("grid",) + TRAJSCOPE}}
            entry["within"] = {m: within(entry[m]["median"], entry["grid"]["median"]) for m in TRAJSCOPE}
            pairs.append(entry)
    lr_free = {wl: {name: stats[wl, name, name]["steps_to_target"] for name in ("prodigy", "schedulefree")}
               for wl in budgets}
    best = scored["best_method"]
    return {"n": len(studies), "best_method": best, "compute_ratio": methods[best]["compute_ratio"],
            "workloads_within_target": methods[best]["workloads_within_target"],
            "within_pairs": methods[best]["within_pairs"], "beats_lr_free": methods[best]["beats_lr_free"],
            "grid_best_beats_lr_free": scored["grid_best_beats_lr_free"], "methods": methods, "pairs": pairs,
            "lr_free_steps_to_target": lr_free}


def studies_table(summary: dict) -> str:
    head = f"{'workload':<12} {'opt':<6} " + " ".join(f"{m + ' median':>18}" for m in ("grid",) + TRAJSCOPE)
    lines = [head, "-" * len(head)]
    for e in summary["pairs"]:
        cells = []
        for m in ("grid",) + TRAJSCOPE:
            mark = "" if m == "grid" else (" *" if e["within"][m] else "  ")
            cells.append(f"{100 * e[m]['median']:>6.2f}{mark:>2}")
        lines.append(f"{e['workload']:<12} {e['optimizer']:<6} " + " ".join(f"{x:>18}" for x in cells))
    return "\n".join(lines + [f"(medians over {summary['n']} studies; * within 0.5 points of the grid's median best)"])


def within(mean: float, grid_mean: float) -> bool:
    """Within 0.5 points of the grid rate's mean (metrics are fractions); NaN (nothing chosen) never is."""
    return bool(mean >= grid_mean - 0.005)


def _final_or_zero(summary: dict) -> float:
    """A confirming run's final metric; a run that did not finish (diverged, failed) counts as 0."""
    final = (summary.get("final") or {}).get("val_metric")
    return float(final) if summary.get("status") == "finished" and final is not None else 0.0


def confirm_seeds(rows: list[dict], budgets: dict[str, int], root: str, n: int, say=print) -> list[dict]:
    """Rerun, per (workload, optimizer), the grid's best rate and each trajscope method's chosen rate
    (a plain run at that fixed rate, nothing chosen again) on ``n`` fresh seeds (the config's seed + 1
    .. + n, never the benchmark's own), and compare their mean finals: the grid's single-seed maximum
    carries the winner's bias of a maximum over 5 noisy finals, its rate's mean on fresh seeds does
    not. A method is ``within`` when its mean is at least the grid rate's mean minus 0.5 points."""
    from trajscope.sweep import run_configs

    out = []
    for wl, budget in budgets.items():
        for opt in ("sgd", "adamw"):
            picks = [r for r in rows if r["workload"] == wl and r["optimizer"] == opt
                     and r["method"] in ("grid",) + TRAJSCOPE]
            cfg = base(wl, opt, budget)
            entry = {"workload": wl, "optimizer": opt, "seeds": [cfg.seed + k for k in range(1, n + 1)]}
            for r in picks:
                if not math.isfinite(r["lr"]):  # the method failed to choose: nothing to confirm
                    entry[r["method"]] = {"lr": r["lr"], "finals": [], "mean": float("nan"), "not_finished": 0}
                    continue
                runs = run_configs([cfg.model_copy(update={"lr": r["lr"], "seed": s}) for s in entry["seeds"]],
                                   root=root, progress=False)
                finals = [_final_or_zero(s) for s in runs]
                entry[r["method"]] = {"lr": r["lr"], "bench_final": r["final_metric"], "finals": finals,
                                      "mean": sum(finals) / len(finals),
                                      "not_finished": sum(s.get("status") != "finished" for s in runs),
                                      "wall_s": sum(float(s.get("wall_s") or 0.0) for s in runs)}
            entry["within"] = {m: m in entry and within(entry[m]["mean"], entry["grid"]["mean"]) for m in TRAJSCOPE}
            out.append(entry)
            say(entry)
    return out


def summarize_confirm(confirm: list[dict], budgets: dict[str, int], n: int) -> dict:
    """``within_pairs`` and ``workloads_within_target`` of each trajscope method on the seed means."""
    methods = {}
    for m in TRAJSCOPE:
        pairs = sum(e["within"][m] for e in confirm)
        wls = sum(all(e["within"][m] for e in confirm if e["workload"] == wl) for wl in budgets)
        methods[m] = {"within_pairs": pairs, "workloads_within_target": wls, "pairs": len(confirm)}
    best = max(TRAJSCOPE, key=lambda m: (methods[m]["workloads_within_target"], methods[m]["within_pairs"]))
    return {"n": n, "best_method": best, "workloads_within_target": methods[best]["workloads_within_target"],
            "within_pairs": methods[best]["within_pairs"], "methods": methods}


def confirm_table(confirm: list[dict]) -> str:
    head = f"{'workload':<12} {'opt':<6} " + " ".join(f"{m + ' lr / mean':>22}" for m in ("grid",) + TRAJSCOPE)
    lines = [head, "-" * len(head)]
    for e in confirm:
        cells = []
        for m in ("grid",) + TRAJSCOPE:
            c = e.get(m, {"lr": float("nan"), "mean": float("nan")})
            mark = "" if m == "grid" else (" *" if e["within"][m] else "  ")
            cells.append(f"{c['lr']:>9.3g} / {100 * c['mean']:>6.2f}{mark:>2}")
        lines.append(f"{e['workload']:<12} {e['optimizer']:<6} " + " ".join(f"{x:>22}" for x in cells))
    return "\n".join(lines + ["(* within 0.5 points of the grid rate's mean)"])


def table(rows: list[dict]) -> str:
    head = f"{'workload':<12} {'method':<12} {'opt':<12} {'lr':>9} {'final':>7} {'choose':>8} {'total':>7} {'to target':>9} {'wall s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tt = "-" if r["steps_to_target"] is None else str(round(r["steps_to_target"]))
        lines.append(f"{r['workload']:<12} {r['method']:<12} {r['optimizer']:<12} {r['lr']:>9.3g} "
                     f"{100 * r['final_metric']:>7.2f} {r['choose_steps']:>8.0f} {r['total_steps']:>7.0f} {tt:>9} {r['wall_s']:>7.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two workloads at 200 steps (a few minutes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")
    ap.add_argument("--workloads", nargs="*", help="a subset of the workloads")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--root", help="runs root (default: a temporary directory, so nothing is cached)")
    ap.add_argument("--out", default=str(RESULTS / "lr_selection.json"))
    ap.add_argument("--confirm-seeds", type=int, default=0, metavar="N",
                    help="also rerun the grid's best rate and each trajscope method's rate on N fresh seeds "
                         "and compare their means (JSON: confirm, summary.confirm_seeds)")
    ap.add_argument("--studies", type=int, default=1, metavar="N",
                    help="N independent studies (AlgoPerf's external tuning: every method and the grid rerun "
                         "on seeds + 1 .. + N-1, the grid on rotated points); medians in summary.studies")
    a = ap.parse_args(argv)
    if a.confirm_seeds < 0:
        ap.error(f"--confirm-seeds must be 0 or more, got {a.confirm_seeds}")
    if a.studies < 1:
        ap.error(f"--studies must be 1 or more, got {a.studies}")
    torch.set_num_threads(a.threads)
    budgets = dict(QUICK if a.quick else BUDGETS)
    if a.workloads:
        budgets = {w: (QUICK if a.quick else BUDGETS).get(w, 300) for w in a.workloads}
    log = sys.stderr if a.json else sys.stdout
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = a.root or tmp
        studies: list[list[dict]] = []
        for k in range(a.studies):
            study_rows: list[dict] = []
            for wl, budget in budgets.items():
                def say(r, wl=wl, k=k):
                    r["workload"] = wl
                    tag = f" (study {k})" if k else ""
                    print(f"  {wl} {r['method']} {r['optimizer']}{tag}: lr {r['lr']:.3g} final {r['final_metric']:.4f} "
                          f"total {r['total_steps']:.0f} to-target {r['steps_to_target']} ({r['wall_s']:.1f} s)",
                          file=sys.stderr, flush=True)
                study_rows += bench_workload(wl, budget, root, say, study=k)
            studies.append(study_rows)
        rows = studies[0]
        summary = summarize(rows, budgets)
        if a.studies > 1:
            summary["studies"] = summarize_studies(studies, budgets)
        confirm = []
        if a.confirm_seeds:
            def say_confirm(e):
                print(f"  confirm {e['workload']} {e['optimizer']}: " + ", ".join(
                    f"{m} {e[m]['lr']:.3g} mean {e[m]['mean']:.4f}" for m in ("grid",) + TRAJSCOPE if m in e),
                    file=sys.stderr, flush=True)
            confirm = confirm_seeds(rows, budgets, root, a.confirm_seeds, say_confirm)
            summary["confirm_seeds"] = summarize_confirm(confirm, budgets, a.confirm_seeds)
    summary["wall_s"] = time.perf_counter() - t0
    result = {"budgets": budgets, "rows": rows, "summary": summary}
    if a.studies > 1:
        result["study_rows"] = studies[1:]
    if confirm:
        result["confirm"] = confirm
    print(table(rows), file=log)
    if a.studies > 1:
        print(studies_table(summary["studies"]), file=log)
    if confirm:
        print(confirm_table(confirm), file=log)
    print(json.dumps(summary, indent=1, default=str), file=log)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    if a.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
