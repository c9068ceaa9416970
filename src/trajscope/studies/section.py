"""A study's report section: one self-contained HTML file with its figures and its table of the
paper's numbers against this run's (the report's CSS and Content-Security-Policy; no script)."""

from __future__ import annotations

from html import escape
from pathlib import Path

from trajscope.report.html import CSP, CSS, image, table
from trajscope.report.panel import Figure, Table


def findings_table(result) -> Table:
    rows = [[f.claim, f.paper, f.measured, f.verdict, f.why] for f in result.findings]
    return Table(["claim", "paper", "this run", "verdict", "why"], rows,
                 caption="verdicts: reproduced, partly, not" + (" (quick run: reduced settings)" if result.quick else ""))


def section_html(result) -> str:
    from trajscope import __version__

    figs = "".join(image(Figure(k, k.replace("-", " "), Path(p).read_bytes())) for k, p in result.figures.items())
    notes = "".join(f"<li>{escape(n)}</li>" for n in result.notes)
    counts = {v: sum(f.verdict == v for f in result.findings) for v in ("reproduced", "partly", "not")}
    tally = ", ".join(f"{n} {v}" for v, n in counts.items())
    title = f"study {result.study}: {result.title}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<link rel="icon" href="data:,"><title>{escape(title)}</title><style>{CSS}</style></head>\n'
            f'<body><header><h1>{escape(title)}</h1><p class="sub">{escape(tally)}; '
            f'{len(result.runs)} runs; {result.wall_s:.0f} s</p></header>'
            f'<section id="findings"><h2>Paper against this run</h2>{table(findings_table(result))}</section>'
            + (f'<section id="notes"><h2>Notes</h2><ul>{notes}</ul></section>' if notes else "")
            + (f'<section id="figures"><h2>Figures</h2>{figs}</section>' if figs else "")
            + f"<footer>trajscope {escape(__version__)}</footer></body></html>\n")


def write_section(result, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(section_html(result), encoding="utf-8")
    tmp.replace(path)
    return path
