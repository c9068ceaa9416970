"""trajscope: record, measure and steer the early phase of PyTorch training.

>>> import trajscope
>>> run = trajscope.Run.create("runs", config={"lr": 0.1}, seed=0)     # doctest: +SKIP
>>> rec = trajscope.Recorder(model, run)                                # doctest: +SKIP
>>> rec.step(loss=loss, optimizer=opt)   # after each optimizer step      doctest: +SKIP
"""

__version__ = "0.1.0"

from trajscope import runs, schedules  # noqa: E402
from trajscope.config import RecordConfig, RunConfig  # noqa: E402
from trajscope.errors import DivergedError, TrajscopeError  # noqa: E402
from trajscope.events import Event  # noqa: E402
from trajscope.record import Recorder  # noqa: E402
from trajscope.store import Run  # noqa: E402

__all__ = ["Event", "DivergedError", "RecordConfig", "Recorder", "Run", "RunConfig", "TrajscopeError",
           "Trainer", "runs", "schedules", "select_lr", "__version__"]


def __getattr__(name):
    # The trainer pulls in every workload; import it on first use only.
    if name == "Trainer":
        from trajscope.train import Trainer

        return Trainer
    if name == "select_lr":
        from trajscope.controllers.lr_select import select_lr

        return select_lr
    raise AttributeError(f"module 'trajscope' has no attribute {name!r}")
