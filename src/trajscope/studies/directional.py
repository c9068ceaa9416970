"""Directional structure of trajectories (Singh et al. 2024): trajectory maps, MDS and windowed MDS
across momentum x weight decay x width, on ``mnist1d-cnn`` and ``modadd-transformer``.

Runs (all from the same seed, recorded with dense-early parameter snapshots: every step up to 20,
then 20 per decade):

- ``mnist1d-cnn`` (widths 16 and 64 channels): SGD, learning rate 0.1 with the workload's
  warmup-cosine schedule, momentum in {0, 0.9} x weight decay in {0, 5e-4}.
- ``modadd-transformer`` (d_model 32 and 64, d_mlp = 4 d_model, 4 heads; the workload's 128 costs
  about 0.3 s per full-batch step on a CPU core): AdamW, learning rate 1e-3,
  full batch; "momentum" is Adam's beta1 in {0, 0.9} and the weight decay is in {0, 1.0}. AdamW's
  decay is decoupled and multiplied by the learning rate, so 5e-4 would shrink the weights by under
  0.1% over the run; 1.0 is the workload's own (grokking) value.

Measures (exact, from the snapshots, group ``all`` = every parameter): MDS, the mean off-diagonal
cosine between the theta_t (the paper's map); the windowed MDS over steps; the displacement map
cos(theta_t - theta_0, theta_T - theta_0), whose last row says when the direction of travel is
fixed. Saturation step t_sat: the first step from which that cosine stays >= 0.9. For the
transformer, the Q, K and V projections each as their own group (``qkv``).

Comparisons are made between runs that differ in one factor only; lower MDS = more exploration.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trajscope.config import RecordConfig, RunConfig
from trajscope.studies.base import Finding, Study, StudyContext, StudyResult, register
from trajscope.studies.common import count_verdict, fmt

SATURATED = 0.9
FULL = {"cnn": {"widths": [16, 64], "steps": 1000},
        "transformer": {"widths": [32, 64], "steps": 300, "p": 113}}
QUICK = {"cnn": {"widths": [4, 8], "steps": 20},
         "transformer": {"widths": [8, 16], "steps": 8, "p": 17}}
MOMENTA, CNN_WD, TF_WD = (0.0, 0.9), (0.0, 5e-4), (0.0, 1.0)


def _record() -> RecordConfig:
    return RecordConfig(snapshots="dense-early", snapshot_dense=20, snapshot_per_decade=20, sketch_dim=0,
                        checkpoint_every=0)


def plan(p: dict) -> list[dict[str, Any]]:
    """One entry per run: workload, width, momentum, weight decay and its RunConfig."""
    out = []
    c, t = p["cnn"], p["transformer"]
    for width in c["widths"]:
        for m in MOMENTA:
            for wd in CNN_WD:
                cfg = RunConfig.for_workload("mnist1d-cnn", workload_options={"width": width}, optimizer="sgd",
                                             lr=0.1, momentum=m, weight_decay=wd, steps=c["steps"],
                                             eval_every=max(c["steps"] // 5, 1), record=_record())
                out.append({"workload": "mnist1d-cnn", "width": width, "momentum": m, "wd": wd, "config": cfg})
    for width in t["widths"]:
        for m in MOMENTA:
            for wd in TF_WD:
                opts = {"p": t["p"], "d_model": width, "d_mlp": 4 * width, "n_heads": 4 if width >= 16 else 2}
                cfg = RunConfig.for_workload("modadd-transformer", workload_options=opts, optimizer="adamw",
                                             lr=1e-3, beta1=m, weight_decay=wd, steps=t["steps"],
                                             eval_every=max(t["steps"] // 5, 1), record=_record())
                out.append({"workload": "modadd-transformer", "width": width, "momentum": m, "wd": wd,
                            "config": cfg})
    return out


def saturation_step(steps: np.ndarray, cosine_to_end: np.ndarray, level: float = SATURATED) -> int | None:
    """The first step from which ``cosine_to_end`` stays >= ``level`` (None if it never does)."""
    below = np.flatnonzero(~(cosine_to_end >= level))
    k = 0 if not len(below) else below[-1] + 1
    return int(steps[k]) if k < len(steps) else None


def measure_run(path: str, qkv: bool) -> dict[str, Any]:
    """MDS, windowed MDS, theta map, saturation step and (``qkv``) Q/K/V maps of one run."""
    from trajscope import measures

    with measures.Trajectory.open(path) as traj:
        res = measures.mds(traj, "all", variant="theta", exact=True)
        tmap = measures.trajectory_map(traj, "all", variant="theta", exact=True, max_points=64)
        disp = measures.trajectory_map(traj, "all", variant="displacement", exact=True)
        out = {"mds": float(res.mds), "window_end_step": res.window_end_step.tolist(),
               "mds_window": res.mds_window.tolist(), "map": tmap.cosine, "map_steps": tmap.end_steps.tolist(),
               "t_sat": saturation_step(disp.end_steps, disp.cosine[-1]), "steps": int(traj.snapshot_steps[-1])}
        if qkv:
            out["qkv"] = {}
            for g in traj.groups("qkv"):
                m = measures.mds(traj, g, variant="theta", exact=True)
                out["qkv"][g.name.rsplit(".", 1)[-1]] = {
                    "mds": float(m.mds), "map": measures.trajectory_map(traj, g, "theta", exact=True,
                                                                        max_points=64).cosine}
    return out


def pairs(runs: list[dict], factor: str) -> list[tuple[dict, dict]]:
    """(low, high) pairs of runs that differ only in ``factor`` (momentum, wd or width)."""
    keys = [k for k in ("workload", "width", "momentum", "wd") if k != factor]
    out = []
    for a in runs:
        for b in runs:
            if all(a[k] == b[k] for k in keys) and a[factor] < b[factor]:
                out.append((a, b))
    return out


@register
class DirectionalStudy(Study):
    name = "directional"
    title = "Directional structure: trajectory maps and MDS across momentum, weight decay and width"
    summary = "trajectory maps/windowed MDS on mnist1d-cnn and modadd-transformer; Q/K/V maps"
    paper = "Singh, He, Hofmann, Schoelkopf 2024 (arXiv 2403.07379)"
    expected_minutes = 5.0  # measured: 227 CPU-seconds

    def run(self, ctx: StudyContext) -> StudyResult:
        p = QUICK if ctx.quick else FULL
        runs = plan(p)
        summaries = ctx.train([r["config"] for r in runs])
        for r, s in zip(runs, summaries):
            r.update(measure_run(s["path"], r["workload"] == "modadd-transformer"), run_id=s.get("run_id"),
                     final_metric=float((s.get("final") or {}).get("val_metric", math.nan)))
        result = StudyResult(self.name, self.title, ctx.quick, self._findings(runs), data=self._data(runs),
                             notes=self._notes())
        result.figures = self._figures(ctx, runs)
        return result

    @staticmethod
    def _findings(runs: list[dict]) -> list[Finding]:
        frac = [r["t_sat"] / r["steps"] for r in runs if r["t_sat"] is not None]
        med = float(np.median(frac)) if frac else math.nan
        if not frac:
            v = ("not", "the displacement never settles on one direction")
        elif med <= 0.2:
            v = ("reproduced", "")
        else:
            v = ("partly" if med <= 0.5 else "not", f"t_sat is at {med:.0%} of the run (20% counts as early)")
        never = len(runs) - len(frac)
        out = [Finding(f"directionality saturates in the initial phase (t_sat: cosine of theta_t - theta_0 to the "
                       f"final displacement stays >= {SATURATED})", "saturates early (<= 20% of training)",
                       f"median t_sat / T = {fmt(med)}" + (f"; {never} runs never saturate" if never else ""), *v)]
        for factor, claim, paper in (("momentum", "momentum increases exploration (lower MDS)", "MDS(0.9) < MDS(0)"),
                                     ("wd", "weight decay increases exploration (lower MDS)", "MDS(wd) < MDS(0)")):
            ps = pairs(runs, factor)
            agree = sum(b["mds"] < a["mds"] for a, b in ps)
            out.append(Finding(claim, paper, f"{agree} of {len(ps)} pairs; mean MDS change "
                               f"{fmt(float(np.mean([b['mds'] - a['mds'] for a, b in ps])) if ps else math.nan)}",
                               *count_verdict(agree, len(ps), "pairs")))
        ps = pairs(runs, "width")
        agree = sum(b["mds"] > a["mds"] for a, b in ps)
        out.append(Finding("width regularizes: the wider net's trajectory is more regular (higher MDS)",
                           "MDS(wide) > MDS(narrow)", f"{agree} of {len(ps)} pairs",
                           *count_verdict(agree, len(ps), "pairs")))
        tps = [(a, b) for a, b in ps if "qkv" in a]
        spread = [(np.ptp([v["mds"] for v in a["qkv"].values()]), np.ptp([v["mds"] for v in b["qkv"].values()]))
                  for a, b in tps]
        agree = sum(wide < narrow for narrow, wide in spread)
        out.append(Finding("scale evens out Q/K/V differences (spread of their MDS)", "spread(wide) < spread(narrow)",
                           "; ".join(f"{fmt(n)} -> {fmt(w)}" for n, w in spread),
                           *count_verdict(agree, len(spread), "optimizer settings")))
        return out

    @staticmethod
    def _data(runs: list[dict]) -> dict[str, Any]:
        keep = ("workload", "width", "momentum", "wd", "mds", "t_sat", "steps", "final_metric", "run_id",
                "window_end_step", "mds_window")
        data = []
        for r in runs:
            d = {k: r[k] for k in keep}
            if "qkv" in r:
                d["qkv_mds"] = {k: v["mds"] for k, v in r["qkv"].items()}
            data.append(d)
        return {"runs": data, "saturated": SATURATED}

    @staticmethod
    def _notes() -> list[str]:
        return ["Transformer: AdamW with beta1 in {0, 0.9} as the momentum factor and weight decay in {0, 1.0} "
                "(decoupled decay: 5e-4 x lr 1e-3 would not move the weights); CNN: SGD with momentum in {0, 0.9} "
                "and weight decay in {0, 5e-4}.",
                "MDS: mean off-diagonal cosine of theta_t over all snapshot pairs (dense early: every step to 20, "
                "then 20 per decade), all parameters, exact.",
                "The paper's runs are ResNets and ViTs/GPT-style models for many epochs; these are small and short, "
                "so the absolute MDS values are not comparable, only the directions of the effects."]

    def _figures(self, ctx: StudyContext, runs: list[dict]) -> dict[str, str]:
        from trajscope.report import style

        figs = {}
        with style.context():
            for wl, key in (("mnist1d-cnn", "maps-cnn"), ("modadd-transformer", "maps-transformer")):
                sel = [r for r in runs if r["workload"] == wl]
                widths = sorted({r["width"] for r in sel})
                fig, axes = style.figure(ncols=4, nrows=len(widths), size=(9.0, 2.3 * len(widths)))
                lo = min(float(np.nanmin(r["map"])) for r in sel)
                for ax, r in zip(axes, sorted(sel, key=lambda r: (r["width"], r["momentum"], r["wd"]))):
                    im = ax.imshow(r["map"], vmin=lo, vmax=1.0, origin="upper")
                    ax.set_title(f"w{r['width']} m{r['momentum']:g} wd{r['wd']:g}: MDS {r['mds']:.4f}", fontsize=7)
                    ax.set_xticks([])
                    ax.set_yticks([])
                fig.colorbar(im, ax=axes, shrink=0.8, label="cosine")
                figs[key] = ctx.save_figure(self.name, key, fig)
            tf = sorted([r for r in runs if "qkv" in r and r["momentum"] > 0 and r["wd"] == 0], key=lambda r: r["width"])
            fig, axes = style.figure(ncols=3, nrows=len(tf), size=(7.0, 2.3 * len(tf)))
            for i, r in enumerate(tf):
                lo = min(float(np.nanmin(v["map"])) for v in r["qkv"].values())
                for j, (name, v) in enumerate(sorted(r["qkv"].items(), key=lambda kv: "qkv".index(kv[0]))):
                    ax = axes[3 * i + j]
                    ax.imshow(v["map"], vmin=lo, vmax=1.0)
                    ax.set_title(f"{name.upper()}, d_model {r['width']}: MDS {v['mds']:.4f}", fontsize=7)
                    ax.set_xticks([])
                    ax.set_yticks([])
            figs["qkv-maps"] = ctx.save_figure(self.name, "qkv-maps", fig)
            fig, axes = style.figure(ncols=2, size=(8.0, 3.2))
            for ax, wl in zip(axes, ("mnist1d-cnn", "modadd-transformer")):
                for i, r in enumerate(r for r in runs if r["workload"] == wl):
                    ax.plot(np.maximum(r["window_end_step"], 1), r["mds_window"], **style.style(0, i, 1),
                            label=f"w{r['width']} m{r['momentum']:g} wd{r['wd']:g}")
                ax.set_xscale("log")
                ax.set_xlabel("window end step (log)")
                ax.set_ylabel("windowed MDS (theta)")
                ax.set_title(wl)
                ax.legend(fontsize=6)
            figs["windowed-mds"] = ctx.save_figure(self.name, "windowed-mds", fig)
        return figs
