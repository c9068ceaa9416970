"""Study ``explr``: weight decay at a fixed learning rate against the equivalent exponentially growing
learning rate without weight decay (Li and Arora, "An exponential learning rate schedule for deep
learning", ICLR 2020).

Runs of ``mnist1d-cnn`` (BatchNorm after every convolution; the same seed, hence the same init
and the same batches), SGD with momentum gamma 0.9 at eta 0.1: ``wd`` weight decay lambda 5e-4 on
the scale-invariant tensors; ``exp`` no weight decay and the rate eta alpha^(-2t-1) on them
(:mod:`trajscope.functional.explr`, controller ``explr``: the other tensors train identically in
both). ``wd-all``/``exp-all`` apply the same to every parameter through the config (weight decay,
and ``lr = eta / alpha``, ``schedule="exp"``, ``exp_growth = alpha^-2``, since the t-th update uses
``lr * exp_growth ** (t - 1)``), outside the theorem's assumption.

Measured at every snapshot step (both runs record parameters and BatchNorm buffers):

- ``cosine`` between the two parameter vectors, for the scale-invariant tensors (found numerically:
  the convolution weights) and for the rest (BatchNorm scale/shift, the linear read-out, which are
  not scale-invariant, so the theorem does not cover them and weight decay acts on them
  differently);
- ``norm ratio`` |theta_exp| / |theta_wd| of the scale-invariant tensors against the predicted
  alpha^(-t);
- ``agreement``: the fraction of validation inputs on which the two models predict the same class,
  with BatchNorm normalizing by the validation set's own statistics (the running statistics average
  batches at different weight scales, so eval mode is not exactly scale-invariant);
- ``divergence_step``: the first step at which 1 - cosine of the scale-invariant weights exceeds
  1e-6 (the equivalence is exact in exact arithmetic; float32 rounding is amplified by training).

Verdict rules (explicit, in :meth:`ExpLR.findings`): equivalence in function space ``reproduced`` if
the final agreement is >= 95%, ``partly`` if >= 80%; the norm growth ``reproduced`` if the final
measured ratio is within 5% of alpha^(-t), ``partly`` within 20%; equal accuracy ``reproduced``
within 1 point, ``partly`` within 3 points.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.functional.explr import exp_lr_alpha, exp_lr_schedule, first_step_mismatch
from trajscope.studies.base import Finding, Study, StudyContext, StudyResult, register
from trajscope.studies.common import final_metric, fmt, init_model, opened
from trajscope.functional.explr import scale_invariant_names
from trajscope.studies.stored import config_of, model_at, predictions

ETA, GAMMA, LAMBDA = 0.1, 0.9, 5e-4


def configs(quick: bool) -> dict[str, RunConfig]:
    """``wd``/``exp``: the theorem's pair, weight decay or the exponential rate on the scale-invariant
    tensors only (controller ``explr``); ``wd-all``/``exp-all``: the same applied to every parameter
    through the config (weight decay / ``schedule="exp"``), which the theorem does not cover."""
    steps = 60 if quick else 2000
    rec = RecordConfig(snapshots="dense-early", snapshot_dense=min(steps, 100), snapshot_per_decade=20,
                       buffers=True, sketch_dim=0, checkpoint_every=0)
    common = dict(optimizer="sgd", momentum=GAMMA, steps=steps, eval_every=max(steps // 20, 1), record=rec,
                  warmup_steps=0)
    base_lr, growth = exp_lr_schedule(ETA, GAMMA, LAMBDA)
    ctl = lambda mode: (CallbackSpec(kind="explr", options={"mode": mode, "weight_decay": LAMBDA}),)
    return {
        "wd": RunConfig.for_workload("mnist1d-cnn", lr=ETA, schedule="constant", controllers=ctl("wd"), **common),
        "exp": RunConfig.for_workload("mnist1d-cnn", lr=ETA, schedule="constant", controllers=ctl("exp"), **common),
        "wd-all": RunConfig.for_workload("mnist1d-cnn", lr=ETA, weight_decay=LAMBDA, schedule="constant", **common),
        "exp-all": RunConfig.for_workload("mnist1d-cnn", lr=base_lr, weight_decay=0.0, schedule="exp",
                                          exp_growth=growth, **common),
    }


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))


def compare(wd: dict, exp: dict, invariant: list[str]) -> dict[str, np.ndarray]:
    """Per common snapshot step: cosine (invariant / other tensors), invariant norm ratio, agreement."""
    with opened(wd) as ra, opened(exp) as rb:
        steps = sorted(set(ra.snapshot_steps("params")) & set(rb.snapshot_steps("params")))
        rows = []
        for s in steps:
            a, b = ra.load_snapshot(s, "params"), rb.load_snapshot(s, "params")
            inv = [n for n in a if n in invariant]
            rest = [n for n in a if n not in invariant]
            flat = lambda d, ns: torch.cat([d[n].double().ravel() for n in ns]) if ns else torch.zeros(1)
            ai, bi, ar, br = flat(a, inv), flat(b, inv), flat(a, rest), flat(b, rest)
            rows.append((s, _cos(ai, bi), _cos(ar, br), float(bi.norm() / ai.norm())))
    _, data, _ = init_model(config_of(wd))
    # BatchNorm with the validation set's own statistics: the running statistics are an average over
    # steps at different weight scales, so eval mode is not exactly scale-invariant
    agree = [float((predictions(model_at(wd, s), data.x_val, batch_stats=True)
                    == predictions(model_at(exp, s), data.x_val, batch_stats=True)).float().mean()) for s in steps]
    arr = np.asarray(rows, dtype=float)
    return {"step": arr[:, 0].astype(int), "cos_invariant": arr[:, 1], "cos_other": arr[:, 2],
            "norm_ratio": arr[:, 3], "agreement": np.asarray(agree)}


def divergence_step(cmp: dict[str, np.ndarray], tol: float = 1e-6) -> int | None:
    """The first compared step at which 1 - cosine of the scale-invariant weights exceeds ``tol``."""
    over = np.nonzero(1.0 - cmp["cos_invariant"] > tol)[0]
    return int(cmp["step"][over[0]]) if len(over) else None


@register
class ExpLR(Study):
    name = "explr"
    title = "weight decay at fixed learning rate = exponential learning rate without weight decay"
    summary = "Li & Arora: SGD+momentum+WD vs the equivalent exp schedule on mnist1d-cnn (cosine, agreement, norm)"
    paper = "Li and Arora, An exponential learning rate schedule for deep learning, ICLR 2020"
    expected_minutes = 8.0

    def run(self, ctx: StudyContext) -> StudyResult:
        cfgs = configs(ctx.quick)
        runs = dict(zip(cfgs, ctx.train(list(cfgs.values()))))
        alpha = exp_lr_alpha(ETA, GAMMA, LAMBDA)
        model, data, wl = init_model(cfgs["wd"])
        invariant = scale_invariant_names(model, wl.loss_fn, (data.x_train[:256], data.y_train[:256]))
        cmp = compare(runs["wd"], runs["exp"], invariant)
        naive = compare(runs["wd-all"], runs["exp-all"], invariant)
        predicted = alpha ** (-cmp["step"].astype(float))
        figures = self.figures(ctx, cmp, naive, predicted, runs)
        findings = self.findings(cmp, naive, predicted, runs)
        data_out = {k: v.tolist() for k, v in cmp.items()}
        data_out["all_parameters"] = {k: v.tolist() for k, v in naive.items()}
        data_out.update(alpha=alpha, predicted_norm_ratio=predicted.tolist(), invariant=invariant,
                        first_step_mismatch=first_step_mismatch(ETA, GAMMA, LAMBDA),
                        divergence_step=divergence_step(cmp), divergence_step_all_parameters=divergence_step(naive),
                        final_accuracy={k: final_metric(v) for k, v in runs.items()})
        notes = [f"alpha = {alpha:.8f} (eta {ETA}, gamma {GAMMA}, lambda {LAMBDA}); the exp rate of update t "
                 f"is eta alpha^(-2(t-1)-1); the all-parameter exp run uses lr = eta/alpha = {cfgs['exp-all'].lr:.6f}, "
                 f"exp_growth = alpha^-2 = {cfgs['exp-all'].exp_growth:.8f}",
                 f"scale-invariant tensors (numerical check): {', '.join(invariant) or 'none'}; in the wd/exp pair "
                 "only these get weight decay or the growing rate (controller explr), the others train at the "
                 "fixed rate without weight decay in both runs",
                 "the exp run's momentum buffer is seeded so that its first update matches (controller explr); "
                 "with empty buffers the runs would differ from step 1 by a radial component of relative size "
                 f"{first_step_mismatch(ETA, GAMMA, LAMBDA):.2e}, which momentum accumulates; the all-parameter "
                 "pair starts with empty buffers, as the config's schedule does"]
        return StudyResult(self.name, self.title, ctx.quick, findings, figures, data=data_out, notes=notes)

    def findings(self, cmp, naive, predicted, runs) -> list[Finding]:
        """Rules: agreement >= 95% reproduced, >= 80% partly; norm ratio within 5% of alpha^-t
        reproduced, within 20% partly; accuracies within 1 point reproduced, 3 points partly; the
        all-parameter pair agreeing more than 1 point less than the theorem's pair reproduced, less
        at all partly."""
        agree, ratio = float(cmp["agreement"][-1]), float(cmp["norm_ratio"][-1])
        t = int(cmp["step"][-1])
        apart = divergence_step(cmp)
        v1 = "reproduced" if agree >= 0.95 else "partly" if agree >= 0.80 else "not"
        rel = abs(ratio / predicted[-1] - 1.0)
        v2 = "reproduced" if rel <= 0.05 else "partly" if rel <= 0.20 else "not"
        acc_wd, acc_exp = final_metric(runs["wd"]), final_metric(runs["exp"])
        gap = abs(acc_wd - acc_exp) * 100 if math.isfinite(acc_wd + acc_exp) else math.inf
        v3 = "reproduced" if gap <= 1.0 else "partly" if gap <= 3.0 else "not"
        why = ("the runs are identical to float32 rounding at first (1 - cosine < 1e-6 up to step "
               f"{apart if apart is not None else t}); rounding and BatchNorm's eps, which makes the invariance "
               "approximate, are then amplified by training until the trajectories decorrelate "
               f"(cosine of the scale-invariant weights {fmt(cmp['cos_invariant'][-1], 4)} at step {t})")
        n_agree = float(naive["agreement"][-1])
        v4 = "reproduced" if n_agree < agree - 0.01 else "partly" if n_agree <= agree else "not"
        return [
            Finding("the two runs compute the same function (prediction agreement on validation)",
                    "equivalent at every step (exact for scale-invariant nets)",
                    f"{agree:.1%} agreement at step {t}; cosine of scale-invariant weights "
                    f"{fmt(cmp['cos_invariant'][-1], 4)}; 1 - cosine below 1e-6 up to step "
                    f"{apart if apart is not None else t}", v1, "" if v1 == "reproduced" else why),
            Finding("weight norm of the exp-LR run grows as alpha^-t relative to the WD run",
                    f"|theta_exp|/|theta_wd| = alpha^-t ({predicted[-1]:.3f} at step {t})",
                    f"{ratio:.3f} (scale-invariant tensors)", v2,
                    "" if v2 == "reproduced" else f"{rel:.1%} off the prediction: " + why),
            Finding("final validation accuracy is the same", "same accuracy",
                    f"WD {acc_wd:.1%}, exp {acc_exp:.1%}", v3,
                    "" if v3 == "reproduced" else f"{gap:.1f} points apart: " + why),
            Finding("the equivalence needs scale invariance: applied to every parameter it holds less well",
                    "theorem stated for scale-invariant parameters",
                    f"all-parameter pair: {n_agree:.1%} agreement, norm ratio {naive['norm_ratio'][-1]:.3f}, "
                    f"accuracies {final_metric(runs['wd-all']):.1%} / {final_metric(runs['exp-all']):.1%}", v4,
                    "" if v4 == "reproduced" else f"the all-parameter pair agrees about as well as the theorem's pair ({agree:.1%})"),
        ]

    def figures(self, ctx, cmp, naive, predicted, runs) -> dict[str, str]:
        from trajscope.report import style
        from trajscope.studies.common import series

        out = {}
        s = cmp["step"]
        with style.context():
            fig, (ax1, ax2, ax3) = style.figure(3, size=(11, 3.4))
            ax1.plot(s, cmp["cos_invariant"], label="scale-invariant tensors")
            ax1.plot(s, cmp["cos_other"], label="other tensors")
            ax1.plot(naive["step"], naive["cos_invariant"], linestyle="--", label="scale-invariant, all-param pair")
            ax1.set_ylabel("cosine(theta_wd, theta_exp)")
            style.step_axis(ax1, True)
            style.legend(ax1)
            ax2.plot(s, cmp["norm_ratio"], label="measured")
            ax2.plot(naive["step"], naive["norm_ratio"], linestyle="-.", label="measured, all-param pair")
            ax2.plot(s, predicted, color="black", linestyle="--", label="alpha^-t (formula)")
            ax2.set_ylabel("|theta_exp| / |theta_wd| (scale-invariant)")
            style.step_axis(ax2, True)
            style.legend(ax2)
            for label, key in (("WD, fixed lr", "wd"), ("exp lr, no WD", "exp")):
                st, v = series(runs[key], "val_metric")
                ax3.plot(st, v, label=label)
            ax3.plot(s, cmp["agreement"], color="black", linestyle=":", label="prediction agreement")
            style.step_axis(ax3, True)
            ax3.set_ylabel("validation accuracy / agreement")
            style.legend(ax3)
            out["equivalence"] = ctx.save_figure(self.name, "equivalence", fig)
        return out
