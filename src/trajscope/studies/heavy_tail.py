"""Study ``heavy-tail``: gradient descent against Adam on heavy-tailed (Zipf) class frequencies
(Kunstner, Milligan, Yadav, Schmidt, Bietti 2024, "Heavy-tailed class imbalance and why Adam
outperforms gradient descent on language models").

Workload ``zipf-classes`` (:mod:`trajscope.workloads.zipf`: 1,000 classes with pi_k ~ 1/(k+1), a linear
softmax model on 32-d Gaussian-mixture inputs, 4,000 training examples). Full-batch training (one
step = one epoch, so no gradient noise: the paper's point is that the gap is not a noise effect),
plain gradient descent (``sgd`` without momentum) against Adam, each over a small learning-rate grid;
each optimizer's best rate is the one with the lowest final training loss. The probe ``bucket_loss``
writes the training loss of 10 frequency buckets (classes sorted by frequency, cut into groups holding
about a tenth of the training examples each; bucket 0 is the most frequent class or two, bucket 9 the
hundreds of rarest) every ``every`` steps. A control pair repeats both best rates on uniform classes
(``exponent`` 0).

Measured per run: the *tail gap*, the mean over the probe steps (the area under the loss curve, so
slow progress counts however late it ends) of the rarest bucket's training loss divided by that of
the most frequent bucket: about 1 when every class is learned at the same pace, large when the rare
classes lag.

Verdict rules (in :meth:`HeavyTail.findings`): GD's tail gap >= 3 ``reproduced``, >= 1.5
``partly``; Adam's tail gap at most half of GD's ``reproduced``, below GD's ``partly``; Adam's best
final training loss at most half of GD's ``reproduced``, lower at all ``partly``; the GD/Adam loss
ratio larger on Zipf classes than on uniform ones ``reproduced``, else ``not``.
"""

from __future__ import annotations

import math

import numpy as np

from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.studies.base import Finding, Study, StudyContext, StudyResult, register
from trajscope.studies.common import fmt, series

BUCKETS = 10
GRIDS = {"sgd": (3.0, 10.0, 30.0, 100.0), "adam": (0.01, 0.03, 0.1, 0.3)}
LABEL = {"sgd": "GD (full batch)", "adam": "Adam (full batch)"}


def settings(quick: bool) -> dict:
    if quick:
        return {"options": {"num_classes": 100, "train": 1000, "val": 500}, "steps": 40, "every": 5,
                "grids": {"sgd": (10.0,), "adam": (0.03,)}}
    return {"options": {}, "steps": 400, "every": 10, "grids": GRIDS}


def config(s: dict, optimizer: str, lr: float, exponent: float | None = None) -> RunConfig:
    options = dict(s["options"])
    if exponent is not None:
        options["exponent"] = exponent
    return RunConfig.for_workload(
        "zipf-classes", workload_options=options, optimizer=optimizer, lr=lr, momentum=0.0, steps=s["steps"],
        eval_every=s["steps"], record=RecordConfig.preset("minimal"),
        probes=(CallbackSpec(kind="bucket_loss", every=s["every"], options={"buckets": BUCKETS}),))


def bucket_curves(summary: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, losses (steps, BUCKETS), overall loss) from the bucket_loss probe."""
    steps, overall = series(summary, "bucket_loss/loss")
    cols = [series(summary, f"bucket_loss/bucket{b}")[1] for b in range(BUCKETS)]
    return steps, np.stack(cols, 1) if cols and len(steps) else np.zeros((0, BUCKETS)), overall


def tail_gap(losses: np.ndarray) -> float:
    """Mean over the probe steps of the rarest bucket's loss / that of the most frequent bucket
    (module docstring); NaN without two non-empty buckets."""
    if not len(losses):
        return math.nan
    ok = np.nonzero(np.isfinite(losses).all(0))[0]
    if len(ok) < 2:
        return math.nan
    return float(losses[:, ok[-1]].mean() / max(losses[:, ok[0]].mean(), 1e-300))


def _final(summary: dict) -> float:
    if summary.get("status") != "finished":
        return math.inf
    return float(series(summary, "bucket_loss/loss")[1][-1])


@register
class HeavyTail(Study):
    name = "heavy-tail"
    title = "gradient descent against Adam on Zipf-distributed classes"
    summary = "Kunstner et al.: GD vs Adam on a generated 1000-class Zipf task, training loss per frequency bucket"
    paper = "Kunstner et al. 2024, Heavy-tailed class imbalance and why Adam outperforms gradient descent on LMs"
    expected_minutes = 10.0

    def run(self, ctx: StudyContext) -> StudyResult:
        s = settings(ctx.quick)
        grid = [(opt, lr) for opt, lrs in s["grids"].items() for lr in lrs]
        results = dict(zip(grid, ctx.train([config(s, o, lr) for o, lr in grid], allow_failed=True)))
        best = {opt: min(s["grids"][opt], key=lambda lr: _final(results[(opt, lr)])) for opt in s["grids"]}
        uniform = dict(zip(best, ctx.train([config(s, o, best[o], exponent=0.0) for o in best], allow_failed=True)))
        curves = {opt: bucket_curves(results[(opt, best[opt])]) for opt in best}
        slow = {opt: tail_gap(c[1]) for opt, c in curves.items()}
        final = {opt: _final(results[(opt, best[opt])]) for opt in best}
        final_uniform = {opt: _final(uniform[opt]) for opt in best}
        figures = self.figures(ctx, curves, best)
        edge = [o for o in best if best[o] in (s["grids"][o][0], s["grids"][o][-1]) and len(s["grids"][o]) > 1]
        notes = [f"best learning rates (lowest final training loss over the grid): GD {best['sgd']:g}, "
                 f"Adam {best['adam']:g}; grids {dict(s['grids'])}"]
        if edge:
            notes.append(f"the best rate of {', '.join(LABEL[o] for o in edge)} is at the edge of its grid")
        if ctx.quick:
            notes.append(f"quick: {s['options']['num_classes']} classes, {s['steps']} steps")
        data = {"best_lr": best, "tail_gap": slow, "final_train_loss": final,
                "final_train_loss_uniform": final_uniform,
                "grid_final_train_loss": {f"{o}:{lr:g}": _final(r) for (o, lr), r in results.items()},
                "final_bucket_loss": {o: c[1][-1].tolist() if len(c[1]) else [] for o, c in curves.items()}}
        return StudyResult(self.name, self.title, ctx.quick, self.findings(slow, final, final_uniform), figures,
                           data=data, notes=notes)

    def findings(self, slow: dict, final: dict, final_uniform: dict) -> list[Finding]:
        g, a = slow["sgd"], slow["adam"]
        v1 = "reproduced" if g >= 3 else "partly" if g >= 1.5 else "not"
        v2 = "reproduced" if a <= g / 2 else "partly" if a < g else "not"
        ratio = final["sgd"] / final["adam"] if final["adam"] > 0 else math.inf
        v3 = "reproduced" if ratio >= 2 else "partly" if ratio > 1 else "not"
        ratio_u = final_uniform["sgd"] / final_uniform["adam"] if final_uniform["adam"] > 0 else math.inf
        v4 = "reproduced" if ratio > ratio_u else "not"
        return [
            Finding("GD makes slow progress on rare classes (tail gap: mean loss over steps, rarest / most frequent bucket)",
                    "almost no progress on rare classes", f"GD tail gap {fmt(g)}x", v1,
                    "" if v1 == "reproduced" else f"GD's rare-class loss is only {fmt(g)}x the frequent-class loss"),
            Finding("Adam makes progress on rare and frequent classes alike", "Adam does progress on rare classes",
                    f"Adam tail gap {fmt(a)}x (GD {fmt(g)}x)", v2,
                    "" if v2 == "reproduced" else "Adam's tail gap is not well below GD's"),
            Finding("Adam reaches a lower training loss than GD (each at its best rate)", "Adam outperforms GD",
                    f"final training loss GD {fmt(final['sgd'])}, Adam {fmt(final['adam'])} ({fmt(ratio)}x)", v3,
                    "" if v3 == "reproduced" else "the gap at the best rates is small on this task"),
            Finding("the gap comes from the heavy tail: smaller on uniform classes", "gap caused by class imbalance",
                    f"GD/Adam loss ratio {fmt(ratio)}x on Zipf, {fmt(ratio_u)}x on uniform classes", v4,
                    "" if v4 == "reproduced" else "the ratio is not larger on Zipf classes"),
        ]

    def figures(self, ctx, curves, best) -> dict[str, str]:
        from matplotlib import cm

        from trajscope.report import style

        out = {}
        with style.context():
            fig, axes = style.figure(2, size=(10, 3.6), sharey=True)
            for ax, opt in zip(axes, ("sgd", "adam")):
                steps, losses, _ = curves[opt]
                for b in range(losses.shape[1]):  # colour by rarity: dark frequent, light rare
                    tag = " (frequent)" if b == 0 else " (rare)" if b == BUCKETS - 1 else ""
                    ax.plot(steps, losses[:, b], label=f"bucket {b}{tag}", color=cm.viridis(b / max(BUCKETS - 1, 1)))
                ax.set_title(f"{LABEL[opt]}, lr {best[opt]:g}")
                style.step_axis(ax, True)
                ax.set_ylabel("training loss per frequency bucket")
            style.legend(axes[1], fontsize=6, ncol=2)
            out["buckets"] = ctx.save_figure(self.name, "buckets", fig)
        return out
