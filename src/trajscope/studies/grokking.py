"""Study ``grokking``: modular addition with weight decay against without (Gromov 2023,
"Grokking modular arithmetic"; the set-up of the ``modadd-mlp`` workload: one-hot (a, b), a
quadratic-activation MLP, MSE, full-batch AdamW at lr 1e-2, p = 97, half of the pairs for training).

Two runs differing only in weight decay (5 as in the paper, and 0), full batch, so one step is one
epoch. Each records parameter snapshots (every step to 100, then 20 per decade), the training-set
loss and accuracy (probe ``train_metrics``) and the kernel velocity on 64 validation inputs (probe
``kernel`` with ``kind="sum"``, the NTK of the summed outputs: 97 times cheaper than the trace kernel,
whose cost would dominate the run; same definition of distance and velocity) every ``probe_every``
steps; the trainer logs validation (test) accuracy every ``eval_every`` steps.

Measured: the first step at which train and test accuracy reach 95% (at the evaluation grid), the
trajectory map of the weight-decay run (cosines between the parameter vectors at the snapshot steps),
the effective dimension (participation ratio of the PCA spectrum, :mod:`trajscope.measures.pca`) of
sliding windows of ``window`` consecutive snapshots, and the step of the largest kernel velocity.

Verdict rules (in :meth:`Grokking.findings`): delayed generalization ``reproduced`` if test accuracy
reaches 95% strictly after train accuracy does, ``partly`` if at the same evaluation, ``not`` if it
never does; time to grok against the paper's ~50 epochs by :func:`~trajscope.studies.common.factor_verdict`
(within 1.5x reproduced, 2.5x partly); no grokking without weight decay ``reproduced`` if that run never
reaches 95% test accuracy or takes at least twice as long, ``partly`` if longer at all; the kernel
moving fastest around the jump ``reproduced`` if the velocity peak lies between half the train-95% step
and twice the test-95% step, else ``not``.
"""

from __future__ import annotations

import math

import numpy as np

from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.studies.base import Finding, Study, StudyContext, StudyResult, register
from trajscope.studies.common import factor_verdict, series

PAPER_EPOCHS = 50.0


def settings(quick: bool) -> dict:
    if quick:
        return {"options": {"p": 23, "width": 64}, "steps": 60, "eval_every": 2, "probe_every": 4, "window": 6}
    return {"options": {}, "steps": 400, "eval_every": 2, "probe_every": 4, "window": 10}


def configs(quick: bool) -> dict[str, RunConfig]:
    s = settings(quick)
    rec = RecordConfig(snapshots="dense-early", snapshot_dense=100, snapshot_per_decade=20, sketch_dim=256,
                       checkpoint_every=0)
    probes = (CallbackSpec(kind="train_metrics", every=s["eval_every"]),
              # KernelProbe takes no `every`; an int schedule means every n steps
              CallbackSpec(kind="kernel", options={"schedule": s["probe_every"], "kind": "sum", "size": 64}))
    out = {}
    for key, wd in (("wd", 5.0), ("no-wd", 0.0)):
        out[key] = RunConfig.for_workload("modadd-mlp", workload_options=s["options"], weight_decay=wd,
                                          steps=s["steps"], eval_every=s["eval_every"], record=rec, probes=probes)
    return out


def first_reach(steps: np.ndarray, values: np.ndarray, level: float = 0.95) -> int | None:
    """The first step whose value is >= ``level`` (None if never)."""
    hit = np.nonzero(values >= level)[0]
    return int(steps[hit[0]]) if len(hit) else None


def windowed_effective_dim(summary: dict, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(center step, effective dimension) of PCA over each run of ``window`` consecutive snapshots
    (stride window // 2); the center is the median step of the window."""
    from trajscope import measures

    with measures.Trajectory.open(summary["path"]) as traj:
        pts = traj.snapshot_steps
        centers, dims = [], []
        for i in range(0, max(len(pts) - window + 1, 0), max(window // 2, 1)):
            chunk = pts[i:i + window]
            pca = measures.trajectory_pca(traj, "all", exact=True, steps=chunk)
            centers.append(float(np.median(chunk)))
            dims.append(float(pca.effective_dim))
    return np.asarray(centers), np.asarray(dims)


def trajectory_cosines(summary: dict):
    from trajscope import measures

    with measures.Trajectory.open(summary["path"]) as traj:
        return measures.trajectory_map(traj, "all", variant="theta", exact=True, max_points=120)


@register
class Grokking(Study):
    name = "grokking"
    title = "grokking modular addition: weight decay against none"
    summary = "modadd-mlp with and without weight decay: train/test accuracy, trajectory map, eff. dim, kernel velocity"
    paper = "Gromov 2023, Grokking modular arithmetic (set-up); Power et al. 2022 (phenomenon)"
    expected_minutes = 11.0

    def run(self, ctx: StudyContext) -> StudyResult:
        s = settings(ctx.quick)
        cfgs = configs(ctx.quick)
        runs = dict(zip(cfgs, ctx.train(list(cfgs.values()))))
        curves, marks = {}, {}
        for key, summ in runs.items():
            tr_s, tr_v = series(summ, "train_metrics/accuracy")
            te_s, te_v = series(summ, "val_metric")
            kv_s, kv_v = series(summ, "kernel/velocity")
            curves[key] = {"train": (tr_s, tr_v), "test": (te_s, te_v), "velocity": (kv_s, kv_v)}
            # the first measurement's velocity is against the init (the probe's reference at FIT_START)
            peak = int(kv_s[int(np.nanargmax(kv_v))]) if len(kv_s) and np.isfinite(kv_v).any() else None
            marks[key] = {"train95": first_reach(tr_s, tr_v), "test95": first_reach(te_s, te_v),
                          "velocity_peak": peak}
        dim_steps, dims = windowed_effective_dim(runs["wd"], s["window"])
        tmap = trajectory_cosines(runs["wd"])
        figures = self.figures(ctx, curves, marks, dim_steps, dims, tmap)
        data = {"marks": marks, "effective_dim": {"step": dim_steps.tolist(), "value": dims.tolist()},
                "final_test_accuracy": {k: float(c["test"][1][-1]) if len(c["test"][1]) else math.nan
                                        for k, c in curves.items()}}
        notes = ["full batch: one step is one epoch; accuracies at the evaluation grid "
                 f"(every {s['eval_every']} steps)",
                 "kernel velocity: NTK of the summed outputs on 64 validation inputs (kind='sum'), "
                 f"every {s['probe_every']} steps"]
        if ctx.quick:
            notes.append(f"quick: p = {s['options']['p']}, width {s['options']['width']}, {s['steps']} steps")
        return StudyResult(self.name, self.title, ctx.quick, self.findings(marks), figures, data=data, notes=notes)

    def findings(self, marks: dict) -> list[Finding]:
        wd, nowd = marks["wd"], marks["no-wd"]
        tr, te = wd["train95"], wd["test95"]
        if te is None:
            v1, why1 = "not", "test accuracy never reached 95% within the run"
        elif tr is not None and te > tr:
            v1, why1 = "reproduced", ""
        else:
            v1, why1 = "partly", "train and test accuracy reached 95% at the same evaluation: no measurable delay"
        v2, why2 = factor_verdict(float(te) if te is not None else math.nan, PAPER_EPOCHS)
        te0 = nowd["test95"]
        if te is None:
            v3, why3 = "not", "the weight-decay run did not grok either, so there is nothing to compare"
        elif te0 is None or te0 >= 2 * te:
            v3, why3 = "reproduced", ""
        elif te0 > te:
            v3, why3 = "partly", f"without weight decay it groks later ({te0} steps) but not twice as late"
        else:
            v3, why3 = "not", f"without weight decay it groks as fast ({te0} steps against {te})"
        peak = wd["velocity_peak"]
        lo, hi = (tr or 0) / 2, 2 * (te if te is not None else math.inf)
        v4 = "reproduced" if peak is not None and lo <= peak <= hi else "not"
        why4 = "" if v4 == "reproduced" else (f"the velocity peaks at step {peak}, outside [{lo:g}, {hi:g}]"
                                              if peak is not None else "no kernel velocity was measured")
        return [
            Finding("with weight decay, test accuracy reaches 95% after train accuracy (delayed generalization)",
                    "test accuracy jumps long after train accuracy",
                    f"train 95% at step {tr}, test 95% at step {te}", v1, why1),
            Finding("time to grok with weight decay 5", f"about {PAPER_EPOCHS:g} epochs (full batch)",
                    f"{te} steps" if te is not None else "did not grok", v2, why2),
            Finding("without weight decay it does not grok (within the budget, or much later)",
                    "weight decay drives grokking", f"test 95% at step {te0}" if te0 is not None
                    else "never reached 95%", v3, why3),
            Finding("the kernel moves fastest around the jump", "no number (representation change at grokking)",
                    f"largest kernel velocity at step {peak}", v4, why4),
        ]

    def figures(self, ctx, curves, marks, dim_steps, dims, tmap) -> dict[str, str]:
        from trajscope.report import style

        out = {}
        with style.context():
            fig, axes = style.figure(2, size=(10, 3.4))
            for ax, key in zip(axes, ("wd", "no-wd")):
                for label, name in (("train", "train"), ("test (validation)", "test")):
                    st, v = curves[key][name]
                    ax.plot(st, v, label=label)
                for m, ls in (("train95", ":"), ("test95", "--")):
                    if marks[key][m] is not None:
                        ax.axvline(marks[key][m], color="black", linestyle=ls, linewidth=0.8)
                style.step_axis(ax, True)
                ax.set_ylabel("accuracy")
                ax.set_title(f"weight decay {'5' if key == 'wd' else '0'}")
                style.legend(ax)
            out["accuracy"] = ctx.save_figure(self.name, "accuracy", fig)

            fig, (ax1, ax2, ax3) = style.figure(3, size=(12, 3.6))
            im = ax1.imshow(tmap.cosine, origin="lower", cmap=style.SEQUENTIAL, aspect="auto")
            fig.colorbar(im, ax=ax1, label="cosine")
            ticks = np.linspace(0, len(tmap.end_steps) - 1, 5).astype(int)
            ax1.set_xticks(ticks, [str(int(tmap.end_steps[i])) for i in ticks])
            ax1.set_yticks(ticks, [str(int(tmap.end_steps[i])) for i in ticks])
            ax1.set_title("trajectory map (WD run)")
            ax1.set_xlabel("step")
            ax2.plot(dim_steps, dims)
            ax2.set_ylabel("effective dimension (window PCA)")
            for key, ax in (("wd", ax2),):
                if marks[key]["test95"] is not None:
                    ax.axvline(marks[key]["test95"], color="black", linestyle="--", linewidth=0.8, label="test 95%")
            style.step_axis(ax2, True)
            style.legend(ax2)
            for i, key in enumerate(("wd", "no-wd")):
                st, v = curves[key]["velocity"]
                ax3.plot(st, v, label=f"weight decay {'5' if key == 'wd' else '0'}", **style.style(0, i, 1))
            style.step_axis(ax3, True)
            style.log_y_if_spans(ax3, *[curves[k]["velocity"][1] for k in curves])
            ax3.set_ylabel("kernel velocity (per step)")
            style.legend(ax3)
            out["trajectory"] = ctx.save_figure(self.name, "trajectory", fig)
        return out
