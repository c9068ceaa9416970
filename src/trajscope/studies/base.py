"""What a study is: a recipe that runs its training runs through the store, analyses them, and
ends in a report section with a table of the paper's numbers beside this run's.

A study subclasses :class:`Study`, sets ``name`` (the CLI name), ``title``, ``summary`` (one line
for ``trajscope study --list``), ``paper`` and ``expected_minutes`` (the full version on a 2-core
CPU), and implements :meth:`Study.run`, which receives a :class:`StudyContext` and returns a
:class:`StudyResult`. It trains through :meth:`StudyContext.train`, which goes through
:func:`trajscope.sweep.run_configs`, so runs are cached by config hash (a rerun reuses finished
runs) and can execute on the local or the Ray executor.

Each row of the result's table is a :class:`Finding`: the claim, what the paper reported, what
this run measured, and a verdict (``reproduced``, ``partly`` or ``not``) with a sentence on why
where they differ. ``--quick`` runs a reduced version (under a minute) whose numbers are for the
structure tests only; the verdicts of a quick run are still computed by the same rules.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from trajscope.config import RunConfig
from trajscope.errors import UsageError, unknown_choice

VERDICTS = ("reproduced", "partly", "not")
REGISTRY: dict[str, type["Study"]] = {}


def register(cls: type["Study"]) -> type["Study"]:
    if cls.name in REGISTRY:
        raise ValueError(f"study {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> "Study":
    if name not in REGISTRY:
        raise unknown_choice("study", name, REGISTRY)
    return REGISTRY[name]()


def all_studies() -> list["Study"]:
    return [REGISTRY[n]() for n in sorted(REGISTRY)]


@dataclass
class Finding:
    """One row of a study's table. ``paper`` and ``measured`` are short human-readable strings
    (with units); ``why`` is required unless the verdict is ``reproduced``."""

    claim: str
    paper: str
    measured: str
    verdict: str
    why: str = ""

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if self.verdict != "reproduced" and not self.why:
            raise ValueError(f"finding {self.claim!r}: a verdict of {self.verdict!r} needs a reason")


@dataclass
class StudyResult:
    """What a study returns: the table, figures (PNG files under the output directory), the runs it
    used, free-form ``data`` (JSON values, e.g. the measured curves' summary numbers) and notes
    (e.g. "synthetic CIFAR-format data: the real set is absent")."""

    study: str
    title: str
    quick: bool
    findings: list[Finding]
    figures: dict[str, str] = field(default_factory=dict)  # key -> PNG path
    runs: list[str] = field(default_factory=list)  # run ids
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    section: str | None = None  # path of the HTML section

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StudyContext:
    """What a study runs with: the store root, the quick flag, the executor, and where its
    figures and section go (``out_dir``)."""

    def __init__(self, root: str | Path | None, quick: bool, out_dir: Path, executor: str = "local",
                 jobs: int = 1, address: str | None = None, progress: bool = True):
        self.root, self.quick, self.out_dir = root, quick, Path(out_dir)
        self.executor, self.jobs, self.address, self.progress = executor, jobs, address, progress
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run_ids: list[str] = []

    def train(self, configs: Sequence[RunConfig], allow_failed: bool = False) -> list[dict[str, Any]]:
        """Train (or reuse) every config; return their summaries in order. A run that fails (not
        one that diverges: divergence is a result) raises, unless ``allow_failed``."""
        from trajscope.sweep import failed, run_configs

        results = run_configs(list(configs), root=self.root, executor=self.executor, jobs=self.jobs,
                              address=self.address, progress=self.progress)
        bad = failed(results)
        if bad and not allow_failed:
            raise UsageError(f"{len(bad)} of {len(results)} runs failed; first: {bad[0].get('error')}")
        self.run_ids += [r["run_id"] for r in results if r.get("run_id")]
        return results

    def figure_path(self, study: str, key: str) -> Path:
        return self.out_dir / f"{study}-{key}.png"

    def save_figure(self, study: str, key: str, fig) -> str:
        """Save a matplotlib figure as PNG (the report's style) and return its path."""
        from trajscope.report import style

        path = self.figure_path(study, key)
        path.write_bytes(style.png(fig))
        return str(path)


class Study:
    name: ClassVar[str] = "study"
    title: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    expected_minutes: ClassVar[float] = 0.0

    def run(self, ctx: StudyContext) -> StudyResult:  # pragma: no cover - abstract
        raise NotImplementedError


def run_study(name: str, quick: bool = False, root: str | Path | None = None, out_dir: str | Path | None = None,
              executor: str = "local", jobs: int = 1, address: str | None = None, progress: bool = True,
              say=print) -> StudyResult:
    """Run one study and write its section (``<out_dir>/<name>.html``) and ``<name>.json``.

    ``out_dir`` defaults to ``<root>/studies``. ``say`` receives the line with the expected time
    before the study starts (None to keep quiet).
    """
    from trajscope.store.paths import default_root

    study = get(name)
    root = Path(root) if root is not None else default_root()
    out = Path(out_dir) if out_dir is not None else Path(root) / "studies"
    if say is not None:
        expected = "under a minute" if quick else f"about {study.expected_minutes:.0f} min on 2 CPU cores"
        say(f"study {name}{' (quick)' if quick else ''}: {study.title}; expected time {expected}")
    ctx = StudyContext(root, quick, out, executor=executor, jobs=jobs, address=address, progress=progress)
    t0 = time.perf_counter()
    result = study.run(ctx)
    result.wall_s = time.perf_counter() - t0
    result.runs = list(dict.fromkeys(result.runs or ctx.run_ids))
    from trajscope.studies.section import write_section

    result.section = str(write_section(result, out / f"{name}{'-quick' if quick else ''}.html"))
    (out / f"{name}{'-quick' if quick else ''}.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    return result
