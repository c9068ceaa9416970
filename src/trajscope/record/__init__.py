"""Recording a run: the :class:`Recorder` and full checkpoints."""

from trajscope.record.checkpoint import capture, restore
from trajscope.record.recorder import Recorder, name_filter

__all__ = ["Recorder", "capture", "name_filter", "restore"]
