"""Reports: one self-contained HTML page per run (or comparison of runs), and TensorBoard export.

>>> from trajscope import report
>>> report.write_report(["my-run"], root="runs", out="my-run.html")          # doctest: +SKIP
>>> report.write_report(["run-a", "run-b"], root="runs", figures_dir="figs")  # doctest: +SKIP
>>> report.export_tensorboard("my-run", root="runs", out_dir="tb/my-run")     # doctest: +SKIP

The page embeds every figure as a PNG data URI and loads nothing from elsewhere (no script, font
or style sheet), so it reads offline, by mail or in a paper's supplement. Each panel appears only
where a run holds its data (:data:`~trajscope.report.write.PANELS`, in page order).
"""

from trajscope.report.tensorboard import export_tensorboard
from trajscope.report.write import PANELS, build_panels, write_report

__all__ = ["PANELS", "build_panels", "export_tensorboard", "write_report"]
