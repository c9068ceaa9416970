"""A report panel: a titled section of figures (PNG) and tables (plain text), built from the runs.

A panel function takes the runs (:class:`~trajscope.report.data.RunData`, one or several to
compare) and returns a :class:`Panel`, or None when no run holds its data: a report never shows an
empty panel or a placeholder. Every string in a panel is plain text; the HTML writer escapes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from trajscope.report import style


@dataclass
class Figure:
    """One figure as PNG bytes; ``key`` names its file when saved alone (``<panel>-<key>.png``)."""

    key: str
    caption: str
    png: bytes


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Panel:
    key: str
    title: str
    intro: str = ""
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)

    def add(self, key: str, caption: str, fig) -> None:
        """Render a matplotlib figure to PNG and add it."""
        self.figures.append(Figure(key, caption, style.png(fig)))

    def __bool__(self) -> bool:
        return bool(self.figures or self.tables)


PanelFn = Callable[[Sequence], "Panel | None"]
