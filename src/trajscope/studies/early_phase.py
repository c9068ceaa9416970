"""Study ``early-phase``: iterative magnitude pruning with rewinding, perturbations at the rewind point,
pre-training before IMP, and the early-phase weight statistics (Frankle, Schwab and Morcos, "The
early phase of neural network training", ICLR 2020), on ``mnist1d-cnn``, and the rewinding chains
again on ``mnist5k-cnn`` (real MNIST digits) in the full version.

Every pruning round is a run whose config names the ``imp`` controller
(:mod:`trajscope.controllers.prune`), so rounds are cached by config hash and a chain of rounds is a
chain of run ids. Settings (full version; the quick one shrinks every number):

- the dense ``mnist1d-cnn`` run: T = 400 steps, the workload's SGD (momentum 0.9, lr 0.1, cosine schedule to 0 at T);
  its snapshots (every step to 100, then 20 per decade, with BatchNorm buffers) are the rewind points;
- rewinding: for each k in K = {0, 50, 200}, rounds r = 1..5, each pruning 20% of the surviving
  conv and linear weights globally by magnitude from the previous round's final weights, rewinding
  the survivors to the dense run's step k and training T - k steps with the learning-rate schedule
  rewound too (the t-th update uses the dense run's rate of update k + t; the momentum buffer
  restarts empty): sparsity 1 - 0.8^r;
- perturbations at k_p = 50: the rewind state perturbed (``sign-reinit``: fresh init magnitudes with
  the rewound signs; ``permute``: a random permutation within each tensor; ``noise``: Gaussian noise
  of the tensor's init std), then a dense run from it (T - k_p steps) and 3 rounds of IMP rewinding to
  the same perturbed state;
- pre-training before IMP: 100 steps on ``mnist1d-pretext`` (:mod:`trajscope.workloads.pretext`: blurred
  inputs, the 4-way reversal/negation task, random labels, true labels; constant lr 0.1, momentum 0.9),
  then a dense run of T steps from the pre-trained weights (the read-out re-initialized after the
  self-supervised task, whose labels differ) and 3 rounds rewinding to the pre-trained weights;
- early-phase statistics of the dense run from its snapshots (:func:`trajscope.measures.early_statistics`):
  relative distance from init, cosine to init and the fraction of weights whose sign flipped;
- ``mnist5k-cnn`` (full version only; the quick one skips it): the dense run and the rewinding
  chains alone, T = 1000 steps (16 epochs of its 4,000 training images at batch 64) of the workload's
  SGD (momentum 0.9, lr 0.05, cosine to 0 at T), K = {0, 60, 240} (about one and four epochs; the
  paper's few hundred ResNet-20 iterations are about one CIFAR-10 epoch), 5 rounds of 20%; the dense
  run keeps a snapshot every 60 steps (the rewind points). No perturbations, pre-training or
  statistics on it: the mnist1d-cnn parts cover those, and they would triple its cost.

The accuracy of a round is its final validation accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.studies.base import Finding, Study, StudyContext, StudyResult, register
from trajscope.studies.common import final_metric, fmt

PERTURBATIONS = ("sign-reinit", "permute", "noise")
PRETEXT = ("blur", "flip", "random-labels", "labels")


# the dense mnist1d-cnn run snapshots every early step (the statistics) with the BatchNorm buffers
EARLY = {"snapshots": "dense-early", "snapshot_dense": 100, "snapshot_per_decade": 20, "buffers": True}


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"workload": "mnist1d-cnn", "T": 30, "K": (0, 10), "k_p": 10, "rounds": 1, "side_rounds": 1,
                "pretrain": 10, "record": EARLY}
    return {"workload": "mnist1d-cnn", "T": 400, "K": (0, 50, 200), "k_p": 50, "rounds": 5, "side_rounds": 3,
            "pretrain": 100, "record": EARLY}


def settings_mnist5k(quick: bool) -> dict[str, Any] | None:
    """The mnist5k-cnn rewinding chains (module docstring); None in the quick version."""
    if quick:
        return None
    # the dense run only needs its rewind points: a snapshot every 60 steps holds K
    return {"workload": "mnist5k-cnn", "T": 1000, "K": (0, 60, 240), "rounds": 5,
            "record": {"snapshots": "every", "snapshot_every": 60}}


def _imp(**options) -> tuple[CallbackSpec, ...]:
    return (CallbackSpec(kind="imp", options={k: v for k, v in options.items() if v is not None}),)


def dense_config(s: dict) -> RunConfig:
    rec = RecordConfig(**s["record"], sketch_dim=0, checkpoint_every=s["T"])
    return RunConfig.for_workload(s["workload"], steps=s["T"], eval_every=max(s["T"] // 6, 1), record=rec)


def round_config(s: dict, steps: int, **imp_options) -> RunConfig:
    """A run of ``steps`` steps with the imp controller; records only scalars and its final checkpoint."""
    rec = RecordConfig(snapshots="none", sketch_dim=0, checkpoint_every=steps)
    return RunConfig.for_workload(s["workload"], steps=steps, eval_every=steps, record=rec,
                                  controllers=_imp(schedule_steps=s["T"], **imp_options))


def pretrain_config(s: dict, task: str) -> RunConfig:
    rec = RecordConfig(snapshots="none", sketch_dim=0, checkpoint_every=s["pretrain"])
    return RunConfig.for_workload("mnist1d-pretext", workload_options={"task": task}, steps=s["pretrain"],
                                  eval_every=s["pretrain"], record=rec)


class Chains:
    """The IMP chains: name -> list of run summaries (round 0 = the chain's dense run)."""

    def __init__(self):
        self.runs: dict[str, list[dict]] = {}

    def accuracy(self, name: str) -> list[float]:
        return [final_metric(r) for r in self.runs[name]]


# a chain: name -> (workload settings, rounds, imp options shared by its rounds, steps per round)
Spec = dict[str, tuple[dict, int, dict, int]]


def rewind_spec(s: dict, dense_id: str, prefix: str = "") -> Spec:
    """The plain rewinding chains ``{prefix}k=<k>``, k in ``s["K"]``, on the dense run ``dense_id``."""
    return {f"{prefix}k={k}": (s, s["rounds"], {"rewind_run": dense_id, "rewind_step": k, "schedule_offset": k},
                               s["T"] - k) for k in s["K"]}


def run_chains(ctx: StudyContext, s: dict, s5: dict | None = None) -> tuple[dict, Chains, dict]:
    """Train everything round by round (each round one batch of runs); return (dense, chains, pre).
    With ``s5`` (:func:`settings_mnist5k`) the chains also hold ``mnist5k:k=<k>``."""
    first = ctx.train([dense_config(s)] + [pretrain_config(s, t) for t in PRETEXT]
                      + ([dense_config(s5)] if s5 else []))
    dense, pre = first[0], dict(zip(PRETEXT, first[1:]))
    did, T, kp = dense["run_id"], s["T"], s["k_p"]
    chains = Chains()
    spec = rewind_spec(s, did)
    if s5:
        spec.update(rewind_spec(s5, first[-1]["run_id"], "mnist5k:"))
    for name in spec:  # the plain rewinding chains prune their dense run itself
        chains.runs[name] = [first[-1] if name.startswith("mnist5k:") else dense]
    for p in PERTURBATIONS:
        spec[p] = (s, s["side_rounds"], {"rewind_run": did, "rewind_step": kp, "schedule_offset": kp,
                                         "perturb": p}, T - kp)
    for t in PRETEXT:
        keep = ["head."] if t == "flip" else None
        spec[f"pre:{t}"] = (s, s["side_rounds"], {"rewind_run": pre[t]["run_id"], "keep_init": keep}, T)
    todo = [n for n in spec if n not in chains.runs]  # these train their own dense run first
    out = ctx.train([round_config(spec[n][0], spec[n][3], **spec[n][2]) for n in todo])
    for n, r in zip(todo, out):
        chains.runs[n] = [r]
    for r in range(1, max(v[1] for v in spec.values()) + 1):
        names = [n for n in spec if spec[n][1] >= r]
        cfgs = [round_config(spec[n][0], spec[n][3], mask_run=chains.runs[n][-1]["run_id"], **spec[n][2])
                for n in names]
        for n, res in zip(names, ctx.train(cfgs)):
            chains.runs[n].append(res)
    return dense, chains, pre


def sparsity(r: int) -> float:
    return 1.0 - 0.8 ** r


def verdict_gain(gain_points: float, full: float = 1.0) -> str:
    """``reproduced`` for a gain >= ``full`` points, ``partly`` for any positive gain, else ``not``."""
    if not math.isfinite(gain_points):
        return "not"
    return "reproduced" if gain_points >= full else "partly" if gain_points > 0 else "not"


def rewind_findings(acc: dict[str, list[float]], K, R: int, prefix: str = "", where: str = "") -> list[Finding]:
    """The two rows of the chains ``{prefix}k=<k>`` after round ``R``: the best k > 0 against the
    dense network (``reproduced`` within 1 point below it, ``partly`` within 3, else ``not``) and
    against k = 0 (:func:`verdict_gain` of the gain in points). ``where`` ends the claims."""
    dense, k0 = acc[f"{prefix}k=0"][0], acc[f"{prefix}k=0"][R]
    late = {k: acc[f"{prefix}k={k}"][R] for k in K if k > 0}
    k_best = max(late, key=lambda k: late[k])
    gap = (late[k_best] - dense) * 100
    v1 = "reproduced" if gap >= -1 else "partly" if gap >= -3 else "not"
    gain0 = (late[k_best] - k0) * 100
    return [
        Finding(f"rewinding to k > 0 keeps dense accuracy at {sparsity(R):.0%} sparsity{where}",
                "rewinding to a few hundred iterations matches the dense network",
                f"best k = {k_best}: {late[k_best]:.1%} vs dense {dense:.1%}", v1,
                "" if v1 == "reproduced" else f"{-gap:.1f} points below the dense network"),
        Finding(f"rewinding to 0 is worse than late rewinding at {sparsity(R):.0%} sparsity{where}",
                "k = 0 fails at high sparsity", f"k = 0: {k0:.1%}, k = {k_best}: {late[k_best]:.1%}",
                verdict_gain(gain0), "" if gain0 >= 1 else
                (f"late rewinding gains only {gain0:.1f} points" if gain0 > 0 else  # + 0.0: no "-0.0"
                 f"late rewinding does not beat k = 0 ({gain0 + 0.0:+.1f} points)")
                + " here (a small network that IMP prunes easily)"),
    ]


@register
class EarlyPhase(Study):
    name = "early-phase"
    title = "the early phase: IMP with rewinding, perturbations, pre-training, weight statistics"
    summary = ("Frankle et al.: IMP rewinding to step k, perturbations at k, pre-training, early statistics "
               "(mnist1d-cnn; rewinding also on mnist5k-cnn)")
    paper = "Frankle, Schwab and Morcos, The early phase of neural network training, ICLR 2020"
    expected_minutes = 6.0  # measured: 5.2 min wall (301 s in the study), empty store, --threads 1, shared 2 cores

    def run(self, ctx: StudyContext) -> StudyResult:
        s, s5 = settings(ctx.quick), settings_mnist5k(ctx.quick)
        dense, chains, pre = run_chains(ctx, s, s5)
        stats = early_stats(dense)
        acc = {n: chains.accuracy(n) for n in chains.runs}
        findings = self.findings(s, acc, s5)
        figures = self.figures(ctx, s, acc, stats, s5)
        notes = ["rewinding rewinds the learning-rate schedule with the weights (a run rewound to k trains "
                 "T - k steps at the dense run's rates of steps k+1..T); the momentum buffer restarts empty",
                 "the flip pre-training task is 4-way {x, reversed, negated, both}, the 1-D stand-in for "
                 "rotation prediction (circular shifts are ill-posed: MNIST-1D already translates signals)"]
        if s5:
            notes.append(f"mnist5k-cnn (real MNIST digits) runs only the dense run and the rewinding chains: "
                         f"T = {s5['T']}, K = {s5['K']}, {s5['rounds']} rounds; no perturbations, pre-training "
                         "or statistics on it (the mnist1d-cnn parts cover those)")
        if ctx.quick:
            notes.append(f"quick: T = {s['T']}, K = {s['K']}, one round; mnist5k-cnn is not run (full version only)")
        rounds = max(c["rounds"] for c in (s, s5) if c)
        data = {"accuracy": acc, "sparsity": [sparsity(r) for r in range(rounds + 1)],
                "dense_accuracy": final_metric(dense), "pretrain_accuracy": {t: final_metric(p) for t, p in pre.items()},
                "early_statistics": {k: np.asarray(v).tolist() for k, v in stats.items()}}
        if s5:
            data["dense_accuracy_mnist5k"] = acc["mnist5k:k=0"][0]
        return StudyResult(self.name, self.title, ctx.quick, findings, figures, data=data, notes=notes)

    def findings(self, s: dict, acc: dict[str, list[float]], s5: dict | None = None) -> list[Finding]:
        Rs, kp = s["side_rounds"], s["k_p"]
        out = rewind_findings(acc, s["K"], s["rounds"], where=" (mnist1d-cnn)")
        if s5:
            out += rewind_findings(acc, s5["K"], s5["rounds"], "mnist5k:", " (mnist5k-cnn)")
        base = acc[f"k={kp}"][Rs]
        paper = {"sign-reinit": "fails (for deep networks)", "permute": "fails",
                 "noise": "hurts unless small (here 1x the init std)"}
        for p in PERTURBATIONS:
            drop = (base - acc[p][Rs]) * 100
            out.append(Finding(f"perturbing the rewind state at k = {kp} ({p}) hurts IMP at {sparsity(Rs):.0%} sparsity",
                               paper[p], f"{acc[p][Rs]:.1%} vs unperturbed {base:.1%}", verdict_gain(drop),
                               "" if drop >= 1 else f"only {drop:.1f} points worse than unperturbed rewinding"
                               + (" (a 3-layer network: the paper's failure is for deep ones)" if p == "sign-reinit" else "")))
        k0 = acc["k=0"][Rs]
        pre = {t: acc[f"pre:{t}"][Rs] for t in PRETEXT}
        helped = [t for t in ("blur", "flip") if pre[t] - k0 >= 0.005]
        vb = "reproduced" if len(helped) == 2 else "partly" if helped else "not"
        out.append(Finding("pre-training on blurred inputs or a self-supervised task approximates the early phase",
                           "both beat rewinding to 0", f"blur {pre['blur']:.1%}, flip {pre['flip']:.1%} vs k = 0 "
                           f"{k0:.1%} at {sparsity(Rs):.0%} sparsity", vb,
                           "" if vb == "reproduced" else f"only {len(helped)} of 2 beat k = 0 by 0.5 points"))
        vr = "reproduced" if pre["random-labels"] <= k0 + 0.005 else "not"
        out.append(Finding("pre-training with random labels does not help", "does not help",
                           f"random labels {pre['random-labels']:.1%} vs k = 0 {k0:.1%}", vr,
                           "" if vr == "reproduced" else "random-label pre-training beat rewinding to 0 here"))
        best_other = max(pre[t] for t in ("blur", "flip", "random-labels"))
        vt = ("reproduced" if pre["labels"] >= best_other - 0.005 else
              "partly" if pre["labels"] > k0 else "not")
        out.append(Finding("pre-training with true labels is best", "true labels fastest",
                           f"true labels {pre['labels']:.1%}, best other {best_other:.1%}", vt,
                           "" if vt == "reproduced" else "another pre-training task did better here"))
        return out

    def figures(self, ctx, s, acc, stats, s5: dict | None = None) -> dict[str, str]:
        from trajscope.report import style

        out = {}
        dense = acc["k=0"][0]
        # (title, chains, rounds, legend title, dense accuracy)
        panels = [("rewinding (mnist1d-cnn)", [f"k={k}" for k in s["K"]], s["rounds"], "rewind step", dense),
                  ("perturbations", [f"k={s['k_p']}"] + list(PERTURBATIONS), s["side_rounds"], f"at k = {s['k_p']}",
                   dense),
                  ("pretraining", ["k=0"] + [f"pre:{t}" for t in PRETEXT], s["side_rounds"], "pre-training", dense)]
        if s5:
            panels.append(("rewinding (mnist5k-cnn)", [f"mnist5k:k={k}" for k in s5["K"]], s5["rounds"],
                           "rewind step", acc["mnist5k:k=0"][0]))
        with style.context():
            fig, axes = style.figure(len(panels), size=(4 * len(panels), 3.6))
            for ax in axes[1:3]:  # the mnist1d-cnn panels share their accuracy axis
                ax.sharey(axes[0])
            for ax, panel in zip(axes, panels):
                imp_panel(ax, acc, *panel)
            axes[0].set_ylabel("final validation accuracy (%)")
            out["imp"] = ctx.save_figure(self.name, "imp", fig)
            fig, axes = style.figure(3, size=(12, 3.4))
            for ax, (key, label) in zip(axes, (("relative_distance_from_init", "|w - w0| / |w0|"),
                                               ("cosine_to_init", "cos(w, w0)"),
                                               ("sign_flip_fraction", "fraction of signs flipped"))):
                for i, g in enumerate(stats["groups"]):
                    ax.plot(stats["step"], stats[key][i], label=g, **style.style(0, i, 1))
                ax.set_ylabel(label)
                style.step_axis(ax, True)
            style.legend(axes[2], fontsize=6)
            out["early-statistics"] = ctx.save_figure(self.name, "early-statistics", fig)
        return out


def imp_panel(ax, acc: dict[str, list[float]], title: str, names: list[str], R: int, legend_title: str,
              dense: float) -> None:
    """Final accuracy (%) against sparsity for the chains ``names`` over rounds 0..R, and the dense line."""
    from trajscope.report import style

    x = [sparsity(r) * 100 for r in range(R + 1)]
    for i, n in enumerate(names):
        ax.plot(x, np.asarray(acc[n][:R + 1]) * 100, marker="o", markersize=3, label=n.split(":")[-1],
                **style.style(0, i, 1))
    ax.axhline(dense * 100, color="black", linestyle=":", linewidth=0.8, label="dense")
    ax.set_xlabel("sparsity (% of conv/linear weights pruned)")
    ax.set_title(title)
    style.legend(ax, title=legend_title)


def early_stats(dense: dict) -> dict[str, Any]:
    """Early-phase statistics of the dense run's weights (all of them, and per layer), per snapshot."""
    from trajscope import measures

    with measures.Trajectory.open(dense["path"]) as traj:
        groups = traj.groups(["all", "layers"])
        res = measures.early_statistics_many(traj, groups)
    return {"groups": [g.name for g in groups], "step": res[0].step.tolist(),
            **{k: [getattr(r, k).tolist() for r in res]
               for k in ("relative_distance_from_init", "cosine_to_init", "sign_flip_fraction")}}
