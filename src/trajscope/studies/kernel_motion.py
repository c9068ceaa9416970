"""Kernel motion (Fort et al. 2020): the empirical NTK moves fast for the first 2-4 epochs (the chaotic
transient that fixes the final basin), then at a slow, nearly constant velocity.

Set-up: ``mnist1d-cnn`` (SGD, momentum 0.9, learning rate 0.1, batch 128; a *constant* learning rate,
so that a decaying schedule does not slow the kernel by itself), with a
:class:`~trajscope.probes.kernel.KernelProbe` on the first 32 validation inputs (kernel summed over
the 10 outputs, BatchNorm in eval mode) every 8 steps. The probe writes the kernel distance
S(K_0, K_t) = 1 - <K_0, K_t>_F / (|K_0|_F |K_t|_F) from the initial kernel and the velocity
S(K_prev, K_t) / (t - prev) per step. One epoch is floor(4000 / 128) = 31 steps.

The rule for the step after which the velocity is flat (:func:`flat_step`): with v_late the median
velocity over the last half of the measurements and v~ the velocity smoothed by a running median of
3 measurements, t_flat is the first measured step from which every later v~ stays <= 2 v_late.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.studies.base import Finding, Study, StudyContext, StudyResult, register
from trajscope.studies.common import factor_verdict, fmt, range_verdict, series

WORKLOAD = "mnist1d-cnn"
STEPS_PER_EPOCH = 4000 // 128
FLAT_FACTOR = 2.0
FULL = {"epochs": 16, "every": 8, "size": 32}
QUICK = {"epochs": 2, "every": 8, "size": 8}


def running_median(v: np.ndarray, k: int = 3) -> np.ndarray:
    """Median over a centred window of ``k`` points (shrunk at the ends)."""
    h = k // 2
    return np.array([np.median(v[max(0, i - h):i + h + 1]) for i in range(len(v))])


def flat_step(steps: np.ndarray, velocity: np.ndarray, factor: float = FLAT_FACTOR,
              smooth: int = 3) -> tuple[int | None, float]:
    """(t_flat, v_late) by the module's rule (``smooth``: the running median's window); t_flat is
    None with fewer than 4 measurements."""
    if len(velocity) < 4:
        return None, math.nan
    v_late = float(np.median(velocity[len(velocity) // 2:]))
    above = np.flatnonzero(running_median(velocity, smooth) > factor * v_late)
    k = 0 if not len(above) else above[-1] + 1
    return (int(steps[k]) if k < len(steps) else int(steps[-1])), v_late


def _config(p: dict) -> RunConfig:
    return RunConfig.for_workload(
        WORKLOAD, optimizer="sgd", lr=0.1, momentum=0.9, schedule="constant", batch_size=128,
        steps=p["epochs"] * STEPS_PER_EPOCH, eval_every=STEPS_PER_EPOCH,
        record=RecordConfig(snapshots="none", sketch_dim=0, checkpoint_every=0),
        probes=(CallbackSpec(kind="kernel", options={"schedule": p["every"], "size": p["size"]}),))


@register
class KernelMotionStudy(Study):
    name = "kernel-motion"
    title = "Kernel motion: empirical-NTK velocity and distance from the initial kernel"
    summary = "mnist1d-cnn: kernel velocity fast for a few epochs, then slow and constant"
    paper = "Fort, Dziugaite, Paul, Kharaghani, Roy, Ganguli 2020 (arXiv 2010.15110)"
    expected_minutes = 2.0  # measured: 16 CPU-seconds of training and kernels, plus data

    def run(self, ctx: StudyContext) -> StudyResult:
        p = QUICK if ctx.quick else FULL
        (summary,) = ctx.train([_config(p)])
        steps, velocity = series(summary, "kernel/velocity")
        _, distance = series(summary, "kernel/distance")
        t_flat, v_late = flat_step(steps, velocity)
        m = self._measure(steps, velocity, distance, t_flat, v_late)
        result = StudyResult(self.name, self.title, ctx.quick, self._findings(m),
                             data={**m, "steps": steps.tolist(), "velocity": velocity.tolist(),
                                   "distance": distance.tolist(), "steps_per_epoch": STEPS_PER_EPOCH, **p},
                             notes=self._notes(p) + self._sensitivity(steps, velocity, distance))
        result.figures = self._figures(ctx, steps, velocity, distance, t_flat, v_late)
        return result

    @staticmethod
    def _measure(steps, velocity, distance, t_flat, v_late) -> dict[str, Any]:
        n = len(velocity)
        first_epoch = velocity[steps <= STEPS_PER_EPOCH]
        late = velocity[n // 2:]
        d_flat = float(distance[steps == t_flat][0]) if t_flat is not None else math.nan
        return {"t_flat": t_flat, "t_flat_epochs": t_flat / STEPS_PER_EPOCH if t_flat is not None else math.nan,
                "v_late": v_late, "v_first_epoch": float(np.median(first_epoch)) if len(first_epoch) else math.nan,
                "late_cv": float(late.std() / late.mean()) if n >= 2 and late.mean() > 0 else math.nan,
                "distance_at_flat": d_flat, "distance_end": float(distance[-1]) if n else math.nan}

    @staticmethod
    def _findings(m: dict) -> list[Finding]:
        out = [Finding("the kernel moves fast, then its velocity is flat after a few epochs (t_flat)",
                       "2-4 epochs", f"t_flat = step {m['t_flat']} = {fmt(m['t_flat_epochs'])} epochs",
                       *range_verdict(m["t_flat_epochs"], 2, 4, unit=" epochs"))]
        ratio = m["v_first_epoch"] / m["v_late"] if m["v_late"] > 0 else math.nan
        v = ("reproduced", "") if ratio >= 10 else (("partly", f"velocity falls only {fmt(ratio)}x (10x counts)")
                                                  if ratio >= 3 else ("not", f"velocity falls {fmt(ratio)}x"))
        out.append(Finding("early velocity is much larger than late velocity (median, first epoch / last half)",
                           "orders of magnitude (>= 10x)", f"{fmt(ratio)}x", *v))
        cv = m["late_cv"]
        v = ("reproduced", "") if cv <= 0.5 else (("partly", f"late velocity varies (CV {fmt(cv)} > 0.5)")
                                                 if cv <= 1.0 else ("not", f"late velocity is not steady (CV {fmt(cv)})"))
        out.append(Finding("late velocity is roughly constant (coefficient of variation over the last half)",
                           "slow constant velocity (CV <= 0.5)", fmt(cv), *v))
        frac = m["distance_at_flat"] / m["distance_end"] if m["distance_end"] > 0 else math.nan
        v = factor_verdict(frac, 1.0, close=2.0, near=4.0)
        out.append(Finding("most of the kernel's distance from init is covered in the transient",
                           "S(K_0, K_t_flat) / S(K_0, K_end) near 1 (>= 0.5)", fmt(frac), *v))
        return out

    @staticmethod
    def _sensitivity(steps, velocity, distance) -> list[str]:
        """How much t_flat depends on the rule's constants (SGD noise makes the velocity jitter)."""
        if len(velocity) < 4:
            return []
        alt = {(k, f): flat_step(steps, velocity, f, k)[0] for k in (3, 5) for f in (2.0, 3.0)}
        return ["Sensitivity of t_flat (steps) to the rule: " + ", ".join(
                    f"running median {k}, factor {f:g}: {t}" for (k, f), t in alt.items())
                + f". Distance from the initial kernel at the first measurement (step {int(steps[0])}): "
                  f"{fmt(float(distance[0]))}, at the end: {fmt(float(distance[-1]))}."]

    @staticmethod
    def _notes(p: dict) -> list[str]:
        return [f"{p['epochs']} epochs of {STEPS_PER_EPOCH} steps; kernel probe on {p['size']} validation inputs "
                f"every {p['every']} steps; velocity per step.",
                f"t_flat rule: the first measured step after which the velocity, smoothed by a running median "
                f"of 3, stays <= {FLAT_FACTOR:g}x its median over the last half of the run.",
                "The paper's transient is on CIFAR-10 ResNets with a probe set of hundreds of images; this is a "
                "small 1-D CNN whose kernel scale differs."]

    def _figures(self, ctx, steps, velocity, distance, t_flat, v_late) -> dict[str, str]:
        from trajscope.report import style

        with style.context():
            fig, (a, b) = style.figure(ncols=2, size=(8.0, 3.2))
            epochs = steps / STEPS_PER_EPOCH
            a.plot(epochs, np.maximum(velocity, 1e-12), color=style.PALETTE[0], label="velocity")
            if math.isfinite(v_late):
                a.axhline(FLAT_FACTOR * v_late, color="black", linestyle=":", linewidth=0.8,
                          label=f"{FLAT_FACTOR:g} x late median")
            if t_flat is not None:
                a.axvline(t_flat / STEPS_PER_EPOCH, color=style.PALETTE[3], linestyle="--", label="t_flat")
            a.set_yscale("log")
            a.set_xlabel("epoch")
            a.set_ylabel("kernel velocity (distance per step)")
            a.legend()
            b.plot(epochs, distance, color=style.PALETTE[1])
            if t_flat is not None:
                b.axvline(t_flat / STEPS_PER_EPOCH, color=style.PALETTE[3], linestyle="--")
            b.set_xlabel("epoch")
            b.set_ylabel("kernel distance from init S(K_0, K_t)")
            return {"kernel": ctx.save_figure(self.name, "kernel", fig)}
