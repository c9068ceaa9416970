"""BatchNorm-only training from a switch point (Singh et al. 2024): once the trajectory has become
redundant, training only the BatchNorm scale and shift parameters matches training everything.

Runs, on each workload, with the workload's own schedule and optimizer: one full-training run, and
one run per switch point K in which the freeze controller (``freeze``, ``at_step=K``, kept set
``norm``) sets every parameter except the BatchNorm scales and shifts to ``requires_grad=False``
once step K has been taken, for the rest of the same number of steps (so every run has the same
step budget and the same learning-rate schedule).

- ``mnist1d-cnn`` (3 conv + BatchNorm layers): 1,000 SGD steps.
- ``cifar10-resnet20`` with ``synthetic=True`` (a synthetic CIFAR-format stand-in: 10 smooth random
  templates with gain and noise; the real CIFAR-10 set is absent from this machine and nothing may
  be downloaded): 240 SGD steps of batch 64. ResNet-20 with parameter-free shortcuts has 1,376
  BatchNorm scalars, the paper's count.

Rule: a switch point *matches* full training when its final validation accuracy is within 1
percentage point of the full-training run's (2 points count as partly).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.studies.base import Finding, Study, StudyContext, StudyResult, register
from trajscope.studies.common import count_verdict, final_metric, fmt, opened

MATCH, NEAR = 0.01, 0.02
PAPER_BN_SCALARS = 1376
FULL = {"mnist1d-cnn": {"steps": 1000, "switch": [0, 25, 100, 250, 500], "options": {}, "batch_size": 128},
        "cifar10-resnet20": {"steps": 240, "switch": [0, 30, 60, 120], "options": {"synthetic": True},
                             "batch_size": 64}}
# quick: mnist1d-cnn only (a ResNet-20 evaluation on 1,000 images alone takes seconds on a CPU)
QUICK = {"mnist1d-cnn": {"steps": 16, "switch": [0, 8], "options": {"width": 8}, "batch_size": 128}}


def _config(workload: str, p: dict, switch: int | None) -> RunConfig:
    controllers = () if switch is None else (CallbackSpec(kind="freeze", options={"at_step": switch}),)
    return RunConfig.for_workload(workload, workload_options=p["options"], steps=p["steps"],
                                  batch_size=p["batch_size"], eval_every=max(p["steps"] // 4, 1),
                                  record=RecordConfig(snapshots="none", sketch_dim=0, checkpoint_every=0),
                                  controllers=controllers)


def trainable_after_switch(summary: dict[str, Any]) -> float:
    """The ``freeze/trainable_params`` scalar the controller writes at its switch (NaN if none)."""
    with opened(summary) as run:
        df = run.scalars(["freeze/trainable_params"])
    return float(df["value"].iloc[0]) if len(df) else math.nan


def earliest_match(full: float, points: list[dict], tol: float) -> dict | None:
    """The earliest switch point whose final accuracy is >= full - tol (None if none is)."""
    ok = [r for r in points if math.isfinite(r["final_metric"]) and r["final_metric"] >= full - tol]
    return min(ok, key=lambda r: r["switch"]) if ok else None


@register
class BNOnlyStudy(Study):
    name = "bn-only"
    title = "BatchNorm-only training from a switch point against full training"
    summary = "mnist1d-cnn and (synthetic) cifar10-resnet20: train only BN scalars after step K"
    paper = "Singh, He, Hofmann, Schoelkopf 2024 (arXiv 2403.07379)"
    expected_minutes = 9.0  # measured: 434 CPU-seconds (ResNet-20 runs most of it)

    def run(self, ctx: StudyContext) -> StudyResult:
        p = QUICK if ctx.quick else FULL
        plan = [(wl, k) for wl in p for k in [None, *p[wl]["switch"]]]
        summaries = ctx.train([_config(wl, p[wl], k) for wl, k in plan])
        results: dict[str, dict[str, Any]] = {wl: {"points": [], **{k: v for k, v in p[wl].items()}} for wl in p}
        for (wl, k), s in zip(plan, summaries):
            if k is None:
                results[wl]["full"] = final_metric(s)
                results[wl]["total_params"] = self._total(s)
            else:
                results[wl]["points"].append({"switch": k, "final_metric": final_metric(s),
                                              "trainable": trainable_after_switch(s), "run_id": s.get("run_id")})
        result = StudyResult(self.name, self.title, ctx.quick, self._findings(results), data=results,
                             notes=self._notes() + (["quick run: mnist1d-cnn only"] if ctx.quick else []))
        result.figures = self._figures(ctx, results)
        return result

    @staticmethod
    def _total(summary: dict[str, Any]) -> int:
        from trajscope.studies.common import init_model

        with opened(summary) as run:
            cfg = RunConfig(**run.config)
        model, _, _ = init_model(cfg)
        return sum(p.numel() for p in model.parameters())

    @staticmethod
    def _findings(results: dict[str, dict]) -> list[Finding]:
        out = []
        for wl, r in results.items():
            pts, full = r["points"], r["full"]
            best = earliest_match(full, pts, MATCH)
            near = earliest_match(full, pts, NEAR)
            measured = (f"full {fmt(full)}; " + ", ".join(f"K={q['switch']}: {fmt(q['final_metric'])}" for q in pts))
            if best is not None:
                v = ("reproduced", "")
                measured += f"; matches from K={best['switch']} of {r['steps']}"
            elif near is not None:
                v = ("partly", f"only within {NEAR:.0%} (not {MATCH:.0%}) from K={near['switch']}")
            else:
                v = ("not", f"no switch point comes within {NEAR:.0%} of full training")
            out.append(Finding(f"{wl}: BN-only training from some step on matches full training (within "
                               f"{MATCH:.0%} accuracy)", "matches full training", measured, *v))
        early = [(r["points"][0], max(r["points"][1:], key=lambda q: q["final_metric"])) for r in results.values()
                 if len(r["points"]) > 1]
        agree = sum(a["final_metric"] < b["final_metric"] for a, b in early)
        out.append(Finding("the early phase matters: BN-only from the first switch point is worse than from a later one",
                           "BN-only from init falls short", "; ".join(f"K={a['switch']}: {fmt(a['final_metric'])} vs "
                                                                    f"K={b['switch']}: {fmt(b['final_metric'])}"
                                                                    for a, b in early),
                           *count_verdict(agree, len(early), "workloads")))
        for wl, r in results.items():
            counts = {q["trainable"] for q in r["points"] if math.isfinite(q["trainable"])}
            n = int(next(iter(counts))) if len(counts) == 1 else math.nan
            if wl == "cifar10-resnet20":
                v = ("reproduced", "") if n == PAPER_BN_SCALARS else ("not", f"counted {n} BN scalars")
                out.append(Finding("ResNet-20 trainable parameters after the switch (BN scale and shift)",
                                   f"{PAPER_BN_SCALARS:,} of about 0.27M", f"{n:,} of {r['total_params']:,}", *v))
            else:
                ok = math.isfinite(n) and 0 < n < r["total_params"]
                out.append(Finding(f"{wl}: trainable parameters after the switch (BN scale and shift)",
                                   "a tiny fraction of all parameters (no paper number for this model)",
                                   f"{n:,} of {r['total_params']:,}" if ok else "no switch recorded",
                                   *(("reproduced", "") if ok else ("not", "the freeze did not record a switch"))))
        return out

    @staticmethod
    def _notes() -> list[str]:
        return ["cifar10-resnet20 runs on SYNTHETIC CIFAR-format data (synthetic=true): the real CIFAR-10 set is "
                "absent and nothing is downloaded; its accuracies say nothing about CIFAR-10.",
                f"Match rule: final validation accuracy >= full training's - {MATCH:.0%} ({NEAR:.0%}: partly). "
                "Every run has the same step budget and schedule; the switch only stops the other parameters.",
                "The runs are much shorter than the paper's (hundreds of steps, not 160 epochs)."]

    def _figures(self, ctx: StudyContext, results: dict[str, dict]) -> dict[str, str]:
        from trajscope.report import style

        with style.context():
            fig, axes = style.figure(ncols=len(results), size=(4.0 * len(results), 3.2))
            for ax, (wl, r) in zip(axes, results.items()):
                ks = [q["switch"] for q in r["points"]]
                acc = [q["final_metric"] for q in r["points"]]
                ax.plot(ks, acc, marker="o", color=style.PALETTE[0], label="BN-only after K")
                ax.axhline(r["full"], color=style.PALETTE[1], linestyle="--", label="full training")
                ax.axhspan(r["full"] - MATCH, r["full"], color=style.PALETTE[1], alpha=0.15)
                tr = next((q["trainable"] for q in r["points"] if math.isfinite(q["trainable"])), math.nan)
                ax.set_title(style.text(f"{wl}: {fmt(tr)} of {r['total_params']:,} trainable after K"), fontsize=8)
                ax.set_xlabel(f"switch step K (of {r['steps']})")
                ax.set_ylabel("final validation accuracy")
                if max(ks, default=0) > 0:
                    ax.set_xscale("symlog", linthresh=max(1, min([k for k in ks if k > 0], default=1)))
                ax.legend()
            return {"switch": ctx.save_figure(self.name, "switch", fig)}
