"""Panel: training curves (loss, validation metric, learning rate, norms) on linear and log step axes."""

from __future__ import annotations

from typing import Sequence

from trajscope.report import style
from trajscope.report.data import RunData, natural_key
from trajscope.report.panel import Panel
from trajscope.report.plotting import present, step_plot

LOSS = (("loss", "training loss (batch)"), ("val_loss", "validation loss"))
METRIC = (("val_metric", "validation accuracy"), ("train_metric", "training accuracy"))
NORMS = (("grad_norm", "gradient norm |g|"), ("update_norm", "update norm |Δθ|"),
         ("param_norm", "parameter norm |θ|"))


def _lr_series(runs: Sequence[RunData]) -> list[tuple[str, str]]:
    names = {"lr"} | {n for r in runs for n in r.names("lr")}
    names = sorted(names, key=lambda n: (n != "lr", natural_key(n)))
    return [(n, "learning rate" if n == "lr" else f"learning rate, param group {style.text(n.split('/', 1)[1])}")
            for n in present(runs, names)]


def _present(runs, series):
    names = present(runs, [n for n, _ in series])
    return [s for s in series if s[0] in names]


def training_curves(runs: Sequence[RunData]) -> Panel | None:
    p = Panel("training", "Training curves",
              "Each figure shows the same data on a linear step axis (left) and a log step axis "
              "(right): the early phase lives in the first few percent of the steps. Steps count "
              "optimizer updates; step 0 is the initialization.")
    loss = _present(runs, LOSS)
    if loss:
        p.add("loss", "Loss: training loss of each batch and validation loss (mean over the set).",
              step_plot(runs, loss, "loss (mean over examples)"))
    metric = _present(runs, METRIC)
    if metric:
        targets = {r.target() for r in runs} - {None}
        hlines = [(t, f"target {t:g}") for t in sorted(targets)]
        p.add("metric", "Validation metric, with the workload's target as a dashed line.",
              step_plot(runs, metric, "accuracy (fraction correct)", hlines=hlines))
    lr = _lr_series(runs)
    if lr:
        p.add("lr", "Learning rate of each optimizer step (after schedule and controllers).",
              step_plot(runs, lr, "learning rate"))
    norms = _present(runs, NORMS)
    if norms:
        p.add("norms", "L2 norms over all parameters: the gradient of each step, the update it made, "
                       "and the parameters after it.", step_plot(runs, norms, "L2 norm"))
    return p or None
