"""The runs that the report tests share (no tests here): built once per session by :func:`runs`.

Real runs (digits-mlp, 30 steps) for every panel that has data today: training curves, trajectory
measures (``measures.analyze``), the sharpness, noise, kernel and regime probes (written as the
same scalars by hand where a probe cannot be built); synthetic data in the documented shapes for
the panels whose producers are not written yet (``trace/*`` scalars, landscape results, controller
events); and the runs a report must describe briefly: scalars only, crashed, diverged, and one
whose name, config and events are hostile HTML.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from trajscope.config import RunConfig
from trajscope.events import Callback
from trajscope.store import Run
from trajscope.train import Trainer

HOSTILE = "<script>alert(1)</script> & \"q\" 'a' <b>$x^</b>"
HOSTILE_CONFIG = "<img src=x onerror=alert(2)><script>window.__pwned=1</script>"
STEPS = 30
_CACHE: dict = {}


def config(**kw) -> RunConfig:
    return RunConfig.for_workload("digits-mlp", **{"steps": STEPS, "eval_every": 10, **kw})


class CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, ctx):
        if ctx.step == self.step:
            raise RuntimeError(f"simulated crash at step {ctx.step}")


class NanAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_after_optimizer_step(self, ctx):
        if ctx.step == self.step:
            with torch.no_grad():
                next(ctx.model.parameters()).fill_(math.nan)


def probes() -> list:
    """The real sharpness, noise, kernel and regime probes, or [] where one cannot be built (then
    :func:`synthetic_probes` writes their scalars)."""
    try:
        from trajscope import schedules as S
        from trajscope.probes.kernel import KernelProbe, RegimeProbe
        from trajscope.probes.noise import NoiseProbe
        from trajscope.probes.sharpness import SharpnessProbe

        return [SharpnessProbe(every=3), NoiseProbe(every=3, per_tensor=True), KernelProbe(S.every(3), size=32),
                RegimeProbe(delta=3, size=64)]
    except Exception as e:  # pragma: no cover - a probe still being written
        warnings.warn(f"report tests: probes unavailable ({e}); writing their scalars by hand")
        return []


def synthetic_probes(run: Run) -> None:
    """The probes' scalars (same names as the probes write), by hand."""
    for s in range(3, STEPS + 1, 3):
        lam = 20.0 + 2.5 * s
        run.log_scalars(s, {"sharpness/lambda_max": lam, "sharpness/stability_threshold": 76.0,
                            "sharpness/stability_ratio": lam / 76.0, "noise/b_simple": 10.0 * 1.15 ** s,
                            "noise/snr": 0.05, "noise/snr/0.weight": 0.03, "noise/snr/2.weight": 0.09,
                            "kernel/velocity": 1.0 / (1 + s), "kernel/distance": 1 - math.exp(-s / 8),
                            "regime/similarity": 0.995 + 0.00015 * s, "regime/lag": 3.0, "regime/fallback": 0.0,
                            "regime/label": 0.0 if s <= 8 else 1.0 if s <= 15 else 2.0})


def synthetic_trace(run: Run) -> None:
    """``trace/*`` scalars (no trace probe yet): the documented ``<probe>/<quantity>`` shape."""
    for s in range(0, STEPS + 1, 3):
        run.log_scalars(s, {"trace/hutchinson": 100.0 + 10 * s, "trace/hutchinson_stderr": 5.0})


def synthetic_landscape(run: Run) -> None:
    """A 2-D slice (loss[i, j] at (x[i], y[j])) with a trajectory on it, and a 1-D slice."""
    x, y = np.linspace(-1, 1, 21), np.linspace(-1, 1, 17)
    X, Y = np.meshgrid(x, y, indexing="ij")
    loss = 0.05 + 3 * (X - 0.3) ** 2 + 8 * (Y + 0.2) ** 2  # (21, 17): spans decades
    t = np.linspace(0, 1, 31)
    path = np.stack([-0.8 + 1.1 * t, 0.7 - 0.9 * t + 0.1 * np.sin(9 * t)], 1)
    run.save_result("landscape.pca:all", {"title": "Loss on the top-two PCA plane", "x_label": "PC 1",
                                          "y_label": "PC 2", "loss_label": "training loss"},
                    {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                     {"x": x, "y": y, "loss": loss, "trajectory": path,
                      "trajectory_steps": np.arange(31)}.items()})
    a = np.linspace(-1, 1, 41)
    run.save_result("landscape.random_1d:all", {"title": "Loss along a random direction"},
                    {"alphas": torch.from_numpy(a), "loss": torch.from_numpy(0.2 + a ** 2),
                     "trajectory": torch.from_numpy(np.linspace(-0.5, 0.0, 10))})


def controller_events(run: Run) -> None:
    run.log_event(5, "controller", "lr 0.05 -> 0.1",
                  {"controller": "lr_select", "reason": "sharpness 0.2 of threshold: room to grow", "lr": 0.1})
    run.log_event(15, "controller", "freeze all but BatchNorm",
                  {"controller": "hybrid_freeze", "reason": "MDS over the last 10% of steps > 0.99"})
    run.log_event(25, "controller", "lr 0.1 -> 0.05", {"controller": "lr_select", "reason": "stability ratio 1.3 > 1"})


def full_run(root) -> str:
    from trajscope import measures

    callbacks = probes()
    cfg = config(optimizer="sgd", lr=0.05, momentum=0.9)
    try:
        out = Trainer(cfg, root=root, name="full", progress=False, callbacks=callbacks).fit()
    except Exception as e:  # pragma: no cover - a probe still being written
        warnings.warn(f"report tests: training with the probes failed ({e}); writing their scalars by hand")
        callbacks = []
        out = Trainer(cfg, root=root, name="full", progress=False, overwrite=True).fit()
    measures.analyze(out["path"], groups=["all", "layers"], save=True, progress=False)
    with Run.open(out["path"], write=True) as run:
        if not callbacks:
            synthetic_probes(run)
        synthetic_trace(run)
        synthetic_landscape(run)
        controller_events(run)
        run.commit()
    return out["path"]


def compare_run(root) -> str:
    from trajscope import measures

    out = Trainer(config(optimizer="sgd", lr=0.2, momentum=0.9), root=root, name="compare", progress=False).fit()
    measures.analyze(out["path"], groups=["all"], save=True, progress=False)
    return out["path"]


def scalars_only_run(root) -> str:
    """Hand-written scalars; val_metric reaches digits-mlp's target 0.94 at step 20 (wall 2.5 s)."""
    run = Run.create(root, config={"workload": "digits-mlp", "steps": 40, "lr": 0.1}, seed=0, name="scalars-only")
    for s in range(0, 41):
        run.log_scalars(s, {"loss": 2.3 * math.exp(-s / 10), "lr": 0.1, "wall_s": 0.125 * s})
    for s, v in [(0, 0.1), (10, 0.6), (20, 0.95), (30, 0.97), (40, 0.96)]:
        run.log_scalars(s, {"val_metric": v, "val_loss": 2.3 - 2 * v})
    run.close("finished", step=40)
    return str(run.path)


def crashed_run(root) -> str:
    trainer = Trainer(config(lr=0.002), root=root, name="crashed", progress=False, callbacks=[CrashAt(12)])
    try:
        trainer.fit()
    except RuntimeError:
        pass
    return trainer_path(root, "crashed")


def trainer_path(root, name: str) -> str:
    from trajscope.store import resolve

    return str(resolve(name, root))


def diverged_run(root) -> str:
    out = Trainer(config(lr=0.003), root=root, name="diverged", progress=False, callbacks=[NanAt(8)]).fit()
    assert out["status"] == "diverged", out
    return out["path"]


def hostile_run(root) -> str:
    run = Run.create(root, config={"workload": "digits-mlp", "note": HOSTILE_CONFIG, HOSTILE: 1}, name=HOSTILE)
    for s in range(0, 21):
        run.log_scalars(s, {"loss": 1.0 / (1 + s), "lr": 0.01})
    run.log_event(3, "note", HOSTILE)
    run.log_event(4, "controller", HOSTILE, {"controller": HOSTILE, "reason": HOSTILE_CONFIG})
    run.save_result("landscape<script>", {"title": HOSTILE},
                    {"x": torch.linspace(-1, 1, 11), "loss": torch.linspace(-1, 1, 11) ** 2})
    run.close("finished", step=20)
    return str(run.path)


BUILDERS = {"full": full_run, "compare": compare_run, "scalars": scalars_only_run, "crashed": crashed_run,
            "diverged": diverged_run, "hostile": hostile_run}


def runs(tmp_path_factory) -> dict[str, str]:
    """{kind: run directory} of every run above, built once per test session."""
    if "root" not in _CACHE:
        root = tmp_path_factory.mktemp("report-runs")
        _CACHE.update({"root": str(root), **{k: build(root) for k, build in BUILDERS.items()}})
    return _CACHE


def report(tmp_path_factory, *kinds: str):
    """(html path, figures dir) of the report of the runs ``kinds``, written once per session."""
    from trajscope.report import write_report

    key = ("report",) + kinds
    if key not in _CACHE:
        built = runs(tmp_path_factory)
        d = tmp_path_factory.mktemp("report-" + "-".join(kinds))
        out = write_report([built[k] for k in kinds], out=d / "report.html", figures_dir=d / "figures")
        _CACHE[key] = (out, d / "figures")
    return _CACHE[key]
