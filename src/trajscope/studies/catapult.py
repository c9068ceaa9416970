"""Catapult phase (Lewkowycz et al. 2020) and its phase diagram (Kalra and Barkeshli 2023).

Set-up: ``mnist1d-mlp-mse`` (ReLU MLP, MSE to one-hot targets, plain SGD without momentum, constant
learning rate, batch 512) at two widths and two depths. For each architecture, lambda_0 is the top
Hessian eigenvalue of the MSE training loss at init on the first 1,024 training examples (Lanczos,
:func:`~trajscope.studies.common.init_sharpness`), and the learning rate is eta = c / lambda_0 for c
on a log-like grid from 0.5 to 16. Every run trains the same number of steps (fixed compute) with a
sharpness probe (the same 1,024 examples, every 10 steps) for lambda_t.

Regime of a run, by this rule on the per-step training loss L_t (the mini-batch loss before the
update of step t; L_1 is at init):

- ``divergent``: the run diverged (non-finite loss) or its last training loss is not below L_1;
- ``catapult``: otherwise, if max_{2 <= t <= 50} L_t >= 1.5 L_1 (the loss spikes early, then trains);
- ``lazy``: otherwise (the loss decreases from the start).

Boundaries: c_loss, the geometric midpoint between the largest lazy c below the first catapult c
and that c; c_max, the geometric midpoint between the largest non-divergent c and the next grid
value. The paper: lazy below c = 2, catapult from 2 to c_max, c_max = 4 in theory and about 12 for
ReLU nets; beyond, divergence.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.studies.base import Finding, Study, StudyContext, StudyResult, register
from trajscope.studies.common import (count_verdict, factor_verdict, final_metric, fmt, geometric_midpoint,
                                      init_sharpness, rounded, series)

WORKLOAD = "mnist1d-mlp-mse"
PROBE_SIZE = 1024
EARLY = 50  # steps in which the loss is watched for the spike
SPIKE = 1.5  # max early loss / initial loss that counts as a catapult
FULL = {"archs": [(128, 1), (512, 1), (128, 2), (512, 2)], "cs": [0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16],
        "steps": 600}
QUICK = {"archs": [(64, 1)], "cs": [1, 3, 16], "steps": 60}


def regime(loss: np.ndarray, status: str) -> str:
    """``lazy``, ``catapult`` or ``divergent`` from the per-step losses L_1.. (module docstring)."""
    if status == "diverged" or len(loss) == 0 or not np.isfinite(loss).all() or loss[-1] >= loss[0]:
        return "divergent"
    early = loss[1:EARLY]
    return "catapult" if len(early) and early.max() >= SPIKE * loss[0] else "lazy"


def boundaries(cs: list[float], regimes: list[str]) -> tuple[float, float]:
    """(c_loss, c_max) from the regimes along the ascending grid ``cs`` (NaN where not bracketed)."""
    c_loss = c_max = math.nan
    for i, r in enumerate(regimes):
        if r == "catapult":
            c_loss = geometric_midpoint(cs[i - 1], cs[i]) if i > 0 and regimes[i - 1] == "lazy" else math.nan
            break
    alive = [i for i, r in enumerate(regimes) if r != "divergent"]
    if alive and alive[-1] + 1 < len(cs):
        c_max = geometric_midpoint(cs[alive[-1]], cs[alive[-1] + 1])
    return c_loss, c_max


def _config(width: int, depth: int, lr: float, steps: int) -> RunConfig:
    return RunConfig.for_workload(
        WORKLOAD, workload_options={"width": width, "depth": depth}, optimizer="sgd", lr=lr, momentum=0.0,
        schedule="constant", batch_size=512, steps=steps, eval_every=max(steps // 6, 1),
        record=RecordConfig(snapshots="none", sketch_dim=0, checkpoint_every=0),
        probes=(CallbackSpec(kind="sharpness", every=10, options={"data": "fixed", "fixed_size": PROBE_SIZE}),))


@register
class CatapultStudy(Study):
    name = "catapult"
    title = "Catapult phase: lazy, catapult and divergent regimes of eta = c / lambda_0"
    summary = "MSE MLPs, plain SGD at eta = c/lambda_0: regime boundaries against 2, 4 and ~12"
    paper = "Lewkowycz et al. 2020 (arXiv 2003.02218); Kalra and Barkeshli 2023 (arXiv 2311.02076)"
    expected_minutes = 6.0  # measured: 313 CPU-seconds on an idle core

    def run(self, ctx: StudyContext) -> StudyResult:
        p = QUICK if ctx.quick else FULL
        cs, steps = p["cs"], p["steps"]
        archs = []
        for width, depth in p["archs"]:
            lam0 = init_sharpness(_config(width, depth, 1.0, steps), PROBE_SIZE)
            archs.append({"width": width, "depth": depth, "lambda_0": lam0})
        configs = [_config(a["width"], a["depth"], rounded(c / a["lambda_0"]), steps) for a in archs for c in cs]
        summaries = ctx.train(configs)
        for i, a in enumerate(archs):
            a["runs"] = [self._measure(s, c, rounded(c / a["lambda_0"])) for c, s in zip(cs, summaries[i * len(cs):])]
            a["c_loss"], a["c_max"] = boundaries(cs, [r["regime"] for r in a["runs"]])
        result = StudyResult(self.name, self.title, ctx.quick, self._findings(archs, cs),
                             data={"archs": archs, "cs": cs, "steps": steps, "spike": SPIKE, "early": EARLY},
                             notes=self._notes(steps))
        result.figures = self._figures(ctx, archs)
        return result

    @staticmethod
    def _measure(summary: dict[str, Any], c: float, lr: float) -> dict[str, Any]:
        _, loss = series(summary, "loss")
        lam_steps, lam = series(summary, "sharpness/lambda_max")
        early = lam_steps <= EARLY
        return {"c": c, "lr": lr, "status": summary.get("status"), "regime": regime(loss, summary.get("status")),
                "loss": loss[:EARLY].tolist(), "lambda_steps": lam_steps.tolist(), "lambda": lam.tolist(),
                "lambda_early_end": float(lam[early][-1]) if early.any() else math.nan,
                "final_metric": final_metric(summary), "run_id": summary.get("run_id")}

    def _findings(self, archs: list[dict], cs: list[float]) -> list[Finding]:
        names = [f"w{a['width']}/d{a['depth']}" for a in archs]
        c_loss = [a["c_loss"] for a in archs]
        c_max = [a["c_max"] for a in archs]
        per = "; ".join(f"{n}: {fmt(x)}" for n, x in zip(names, c_loss))
        v1 = factor_verdict(float(np.nanmedian(c_loss)) if np.isfinite(c_loss).any() else math.nan, 2.0)
        out = [Finding("lazy below c = 2, catapult above (c_loss, median over architectures)",
                       "c_loss = 2", per, *v1)]
        per = "; ".join(f"{n}: {fmt(x) if math.isfinite(x) or a['runs'][-1]['regime'] == 'divergent' else f'> {cs[-1]:g}'}"
                        for n, x, a in zip(names, c_max, archs))
        med_max = float(np.nanmedian(c_max)) if np.isfinite(c_max).any() else math.nan
        v2 = factor_verdict(med_max, 12.0)
        if v2[0] != "reproduced" and math.isfinite(med_max):
            v2 = (v2[0], v2[1] + f" (and {med_max / 4:.2f}x the theory's 4)")
        out.append(Finding("training diverges beyond c_max (median over architectures)",
                           "c_max = 4 (theory), about 12 (ReLU nets)", per, *v2))
        cat = [r for a in archs for r in a["runs"] if r["regime"] == "catapult" and math.isfinite(r["lambda_early_end"])]
        drops = sum(r["lambda_early_end"] < 2.0 / r["lr"] for r in cat)
        out.append(Finding(f"in the catapult phase lambda_t falls below 2/eta (by step {EARLY})",
                           "lambda_t < 2/eta after the spike", f"{drops} of {len(cat)} catapult runs (median lambda_t "
                           f"eta / 2 = {fmt(float(np.median([r['lambda_early_end'] * r['lr'] / 2 for r in cat])) if cat else math.nan)})",
                           *count_verdict(drops, len(cat), "catapult runs")))
        best = []
        for a in archs:
            ok = [r for r in a["runs"] if math.isfinite(r["final_metric"])]
            if ok:
                best.append(max(ok, key=lambda r: r["final_metric"]))
        hits = sum(r["regime"] == "catapult" for r in best)
        out.append(Finding("the best final accuracy at fixed compute is in the catapult phase",
                           "best eta in the catapult phase, near eta_max",
                           ", ".join(f"{n}: c={fmt(r['c'])} ({r['regime']})" for n, r in zip(names, best)),
                           *count_verdict(hits, len(best), "architectures")))
        out.append(self._diagram_finding(archs))
        return out

    @staticmethod
    def _diagram_finding(archs: list[dict]) -> Finding:
        """Kalra and Barkeshli: c_loss rises with depth and with 1/width (pairs differing in one)."""
        by = {(a["width"], a["depth"]): a["c_loss"] for a in archs}
        pairs = [((w, d), (w2, d)) for (w, d) in by for (w2, d2) in by if d2 == d and w2 > w]  # narrow, wide
        pairs += [((w, d2), (w, d)) for (w, d) in by for (w3, d2) in by if w3 == w and d2 > d]  # deep, shallow
        comparable = [(by[a], by[b]) for a, b in pairs if math.isfinite(by[a]) and math.isfinite(by[b])]
        agree = sum(x >= y for x, y in comparable)
        return Finding("the lazy/catapult boundary moves up with depth and 1/width",
                       "c_loss grows as depth/width grows", f"c_loss(narrower or deeper) >= c_loss(other) in "
                       f"{agree} of {len(comparable)} pairs",
                       *count_verdict(agree, len(comparable), "architecture pairs"))

    @staticmethod
    def _notes(steps: int) -> list[str]:
        return [f"Regime rule: divergent if the run diverged or its last mini-batch loss is not below the "
                f"initial one; catapult if the loss reaches {SPIKE}x its initial value within the first {EARLY} "
                f"steps; else lazy. Fixed compute: {steps} SGD steps of batch 512 for every run.",
                f"lambda_0 and lambda_t: top Hessian eigenvalue of the MSE loss (0.5 * squared error summed "
                f"over classes, mean over examples) on the first {PROBE_SIZE} training examples.",
                "Mini-batch SGD adds noise to the full-batch theory, and the grid of c is coarse: boundaries are "
                "only known to within the neighbouring grid values."]

    def _figures(self, ctx: StudyContext, archs: list[dict]) -> dict[str, str]:
        from trajscope.report import style

        figs = {}
        n = len(archs)
        with style.context():
            fig, axes = style.figure(ncols=n, size=(3.2 * n, 3.2), sharey=True)
            for ax, a in zip(axes, archs):
                for j, r in enumerate(a["runs"]):
                    loss = np.asarray(r["loss"], dtype=float)
                    ax.plot(np.arange(1, len(loss) + 1), loss, label=f"c={r['c']:g}", **style.style(0, j, 1))
                ax.set_yscale("log")
                start = [r["loss"][0] for r in a["runs"] if r["loss"] and math.isfinite(r["loss"][0])]
                if start:  # diverging runs leave the plot at the top, so that the spikes stay visible
                    ax.set_ylim(top=100 * max(start))
                ax.set_title(f"width {a['width']}, depth {a['depth']}")
                ax.set_xlabel("step")
            axes[0].set_ylabel("training loss (MSE)")
            axes[-1].legend(fontsize=6, ncol=2)
            figs["early-loss"] = ctx.save_figure(self.name, "early-loss", fig)
            fig, axes = style.figure(ncols=n, size=(3.2 * n, 3.2), sharey=True)
            for ax, a in zip(axes, archs):
                for j, r in enumerate(a["runs"]):
                    if r["lambda"]:
                        ax.plot(r["lambda_steps"], np.asarray(r["lambda"]) * r["lr"] / 2, label=f"c={r['c']:g}",
                                **style.style(0, j, 1))
                ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
                ax.set_yscale("log")
                ax.set_title(f"width {a['width']}, depth {a['depth']}")
                ax.set_xlabel("step")
            axes[0].set_ylabel("lambda_t eta / 2 (1 = edge)")
            axes[-1].legend(fontsize=6, ncol=2)
            figs["sharpness"] = ctx.save_figure(self.name, "sharpness", fig)
            fig, axes = style.figure()
            ax = axes[0]
            for i, a in enumerate(archs):
                cs = [r["c"] for r in a["runs"]]
                acc = [r["final_metric"] for r in a["runs"]]
                ax.plot(cs, acc, marker="o", label=f"w{a['width']}/d{a['depth']}", **style.style(0, i, 1))
            for c, label in ((2, "2"), (4, "4"), (12, "12")):
                ax.axvline(c, color="black", linewidth=0.8, linestyle=":")
                ax.text(c, 0.02, label, transform=ax.get_xaxis_transform())
            ax.set_xscale("log")
            ax.set_xlabel("c = eta lambda_0")
            ax.set_ylabel("final validation accuracy")
            ax.legend()
            figs["final-metric"] = ctx.save_figure(self.name, "final-metric", fig)
        return figs
