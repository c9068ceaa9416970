"""Edge of stability (Cohen et al. 2021): under full-batch gradient descent the sharpness rises until
2/eta and then hovers there; with heavy-ball momentum beta the threshold is (2 + 2 beta)/eta.

Set-up: ``mnist1d-mlp-mse`` (ReLU MLP 40-128-128-10, MSE to one-hot targets) with ``samples=6250``,
so the training set has 5,000 examples, and the batch is all of them (full-batch GD, constant
learning rate). lambda_0 is the top Hessian eigenvalue at init on the whole training set; the three
GD learning rates put the threshold at 2/eta = k lambda_0 for k = 1.5, 2, 2.5 (sharpness has to grow
by that factor to reach it), and the momentum run (beta = 0.9) puts (2 + 2 beta)/eta at 2 lambda_0.
A sharpness probe measures lambda_t on the whole training set every 20 steps.

Rules, with r_t = lambda_t / threshold (the probe's ``stability_ratio``): the run *reaches* the
edge at the first measured step with r_t >= 0.9; it *hovers* if the median of r_t over the
measurements from then on lies in [0.8, 1.2].
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.studies.base import Finding, Study, StudyContext, StudyResult, register
from trajscope.studies.common import count_verdict, factor_verdict, fmt, init_sharpness, rounded, series

WORKLOAD = "mnist1d-mlp-mse"
REACH, HOVER = 0.9, (0.8, 1.2)
BETA = 0.9
FULL = {"samples": 6250, "n_train": 5000, "width": 128, "ks": [1.5, 2.0, 2.5], "k_momentum": 2.0,
        "steps": 1500, "every": 20}
QUICK = {"samples": 5000, "n_train": 4000, "width": 32, "ks": [1.2], "k_momentum": 1.2, "steps": 30,
         "every": 5}


def edge_statistics(steps: np.ndarray, ratio: np.ndarray) -> dict[str, Any]:
    """``reach_step`` (first step with ratio >= REACH, or None), ``median_after`` (median ratio from
    then on, NaN if never reached), ``reached`` and ``hovers`` (module docstring)."""
    hit = np.flatnonzero(ratio >= REACH)
    if not len(hit):
        return {"reach_step": None, "median_after": math.nan, "reached": False, "hovers": False}
    med = float(np.median(ratio[hit[0]:]))
    return {"reach_step": int(steps[hit[0]]), "median_after": med, "reached": True,
            "hovers": bool(HOVER[0] <= med <= HOVER[1])}


def _config(p: dict, lr: float, momentum: float) -> RunConfig:
    return RunConfig.for_workload(
        WORKLOAD, workload_options={"width": p["width"], "depth": 2, "samples": p["samples"]}, optimizer="sgd",
        lr=lr, momentum=momentum, schedule="constant", batch_size=p["n_train"], steps=p["steps"],
        eval_every=max(p["steps"] // 10, 1), record=RecordConfig(snapshots="none", sketch_dim=0, checkpoint_every=0),
        probes=(CallbackSpec(kind="sharpness", every=p["every"],
                             options={"data": "fixed", "fixed_size": p["n_train"]}),))


@register
class EdgeOfStabilityStudy(Study):
    name = "edge-of-stability"
    title = "Edge of stability: full-batch GD sharpness against 2/eta and (2+2beta)/eta"
    summary = "full-batch GD on 5,000 MNIST-1D examples: sharpness rises to 2/eta and hovers; momentum"
    paper = "Cohen, Kaur, Li, Kolter, Talwalkar 2021 (arXiv 2103.00065)"
    expected_minutes = 4.0  # measured: 2.5 CPU-minutes of training and probing, plus data

    def run(self, ctx: StudyContext) -> StudyResult:
        p = QUICK if ctx.quick else FULL
        lam0 = init_sharpness(_config(p, 1.0, 0.0), p["n_train"])
        plan = [{"label": f"GD, 2/eta = {k:g} lambda_0", "lr": rounded(2.0 / (k * lam0)), "momentum": 0.0, "k": k}
                for k in p["ks"]]
        km = p["k_momentum"]
        plan.append({"label": f"momentum {BETA:g}, (2+2b)/eta = {km:g} lambda_0",
                     "lr": rounded((2 + 2 * BETA) / (km * lam0)), "momentum": BETA, "k": km})
        summaries = ctx.train([_config(p, r["lr"], r["momentum"]) for r in plan])
        for r, s in zip(plan, summaries):
            steps, lam = series(s, "sharpness/lambda_max")
            _, ratio = series(s, "sharpness/stability_ratio")
            lsteps, loss = series(s, "loss")
            r.update(edge_statistics(steps, ratio), status=s.get("status"), run_id=s.get("run_id"),
                     threshold=(2 + 2 * r["momentum"]) / r["lr"], lambda_steps=steps.tolist(), lambda_=lam.tolist(),
                     loss_steps=lsteps.tolist(), loss=loss.tolist(),
                     lambda_max_over_0=float(lam.max() / lam0) if len(lam) else math.nan)
        result = StudyResult(self.name, self.title, ctx.quick, self._findings(plan),
                             data={"lambda_0": lam0, "runs": plan, **p}, notes=self._notes(p))
        result.figures = self._figures(ctx, plan, lam0)
        return result

    @staticmethod
    def _findings(plan: list[dict]) -> list[Finding]:
        gd = [r for r in plan if r["momentum"] == 0]
        mom = [r for r in plan if r["momentum"] > 0]
        out = [Finding("progressive sharpening: lambda_t rises above lambda_0 (by 20% or more)",
                       "sharpness rises during GD", ", ".join(f"{fmt(r['lambda_max_over_0'])}x" for r in plan),
                       *count_verdict(sum(r["lambda_max_over_0"] >= 1.2 for r in plan), len(plan), "runs"))]
        out.append(Finding(f"GD: sharpness reaches 2/eta (ratio >= {REACH})", "reaches 2/eta",
                           ", ".join(f"k={r['k']:g}: step {r['reach_step']}" for r in gd),
                           *count_verdict(sum(r["reached"] for r in gd), len(gd), "learning rates")))
        out.append(Finding(f"GD: then hovers at 2/eta (median ratio in [{HOVER[0]}, {HOVER[1]}])",
                           "lambda_t / (2/eta) about 1", ", ".join(f"k={r['k']:g}: {fmt(r['median_after'])}" for r in gd),
                           *count_verdict(sum(r["hovers"] for r in gd), len(gd), "learning rates")))
        for r in mom:
            verdict = factor_verdict(r["median_after"], 1.0, close=1.2, near=1.5)
            out.append(Finding(f"momentum {r['momentum']:g}: sharpness hovers at (2+2beta)/eta, not 2/eta",
                               "lambda_t / ((2+2beta)/eta) about 1",
                               f"median ratio {fmt(r['median_after'])} from step {r['reach_step']}"
                               f" (2/eta would be {fmt(2 / r['lr'])}, (2+2beta)/eta = {fmt(r['threshold'])})",
                               *verdict))
        return out

    @staticmethod
    def _notes(p: dict) -> list[str]:
        return [f"{p['n_train']} training examples, full batch, {p['steps']} GD steps, MLP width {p['width']} depth 2, "
                f"MSE loss (0.5 * squared error summed over classes, mean over examples).",
                f"Sharpness: top Hessian eigenvalue on the whole training set by Lanczos (relative residual 1e-2, "
                f"warm-started), every {p['every']} steps; reached = ratio >= {REACH}, hovers = median ratio after "
                f"reaching within [{HOVER[0]}, {HOVER[1]}]."]

    def _figures(self, ctx: StudyContext, plan: list[dict], lam0: float) -> dict[str, str]:
        from trajscope.report import style

        figs = {}
        with style.context():
            fig, axes = style.figure()
            ax = axes[0]
            for i, r in enumerate(plan):
                st = style.style(0, i, 1)
                ax.plot(r["lambda_steps"], r["lambda_"], label=style.text(r["label"]), color=st["color"])
                ax.axhline(r["threshold"], color=st["color"], linestyle="--", linewidth=0.8)
            ax.axhline(lam0, color="black", linestyle=":", linewidth=0.8)
            ax.set_xlabel("step")
            ax.set_ylabel("sharpness lambda_max (dashed: threshold)")
            ax.legend()
            figs["sharpness"] = ctx.save_figure(self.name, "sharpness", fig)
            fig, axes = style.figure()
            ax = axes[0]
            for i, r in enumerate(plan):
                ax.plot(r["loss_steps"], r["loss"], label=style.text(r["label"]), **style.style(0, i, 1))
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("training loss (full batch, MSE)")
            ax.legend()
            figs["loss"] = ctx.save_figure(self.name, "loss", fig)
        return figs
