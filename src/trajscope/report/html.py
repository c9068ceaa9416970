"""The self-contained HTML page: inline CSS, figures as PNG data URIs, no script, no external request.

Every string that comes from a run (names, config values, event messages, result names) is
HTML-escaped here, and the page's Content-Security-Policy allows no script and no request other
than ``data:`` images, so that a hostile run name can neither run code nor phone home.
"""

from __future__ import annotations

import base64
import struct
from html import escape
from typing import Sequence

from trajscope.report.data import RunData, label_runs
from trajscope.report.overview import config_rows, event_rows, overview_rows, status_sentence
from trajscope.report.panel import Figure, Panel, Table

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1a1a1a; background: #fff; margin: 0 auto; max-width: 1000px; padding: 1.5rem; line-height: 1.45; }
h1 { font-size: 1.5rem; margin: 0 0 .3rem; word-break: break-word; }
h2 { font-size: 1.2rem; margin: 2rem 0 .5rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.sub { color: #555; margin: 0 0 1rem; }
.status { border-left: 5px solid #009E73; background: #f3faf7; padding: .5rem .8rem; margin: .4rem 0; }
.status.crashed, .status.diverged { border-color: #D55E00; background: #fdf3ec; }
.status.running { border-color: #E69F00; background: #fdf8ec; }
nav { font-size: .9rem; margin: 1rem 0; } nav a { margin-right: .8rem; color: #0072B2; }
figure { margin: 1rem 0; } figcaption { color: #444; font-size: .9rem; }
img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top;
         word-break: break-word; }
th { background: #f5f5f5; white-space: nowrap; } td.k { font-weight: 600; white-space: nowrap; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: .8rem; padding-top: .2rem; }
ul.kv { columns: 3 16rem; list-style: none; padding: 0; margin: .4rem 0; font-size: .85rem; }
ul.kv li { break-inside: avoid; padding: .1rem 0; word-break: break-word; } ul.kv .k { font-weight: 600; }
details { margin: .5rem 0; } summary { cursor: pointer; color: #0072B2; }
footer { color: #777; font-size: .8rem; margin-top: 2rem; }
"""


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return struct.unpack(">II", data[16:24])


def image(fig: Figure) -> str:
    w, h = png_size(fig.png)
    src = "data:image/png;base64," + base64.b64encode(fig.png).decode("ascii")
    return (f'<figure><img src="{src}" alt="{escape(fig.caption)}" width="{w}" height="{h}">'
            f"<figcaption>{escape(fig.caption)}</figcaption></figure>")


def table(t: Table, key_column: bool = False) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in t.columns)
    body = []
    for row in t.rows:
        cells = [f'<td class="k">{escape(row[0])}</td>' if key_column else f"<td>{escape(row[0])}</td>"]
        cells += [f"<td>{escape(c)}</td>" for c in row[1:]]
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<caption>{escape(t.caption)}</caption>" if t.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def key_values(rows: Sequence[Sequence[str]]) -> str:
    """(key, value) rows as a compact list that flows into columns."""
    items = "".join(f'<li><span class="k">{escape(k)}</span> {escape(v)}</li>' for k, v in rows)
    return f'<ul class="kv">{items}</ul>'


def section(p: Panel) -> str:
    parts = [f'<section id="{escape(p.key)}"><h2>{escape(p.title)}</h2>']
    if p.intro:
        parts.append(f"<p>{escape(p.intro)}</p>")
    parts += [image(f) for f in p.figures]
    parts += [table(t) for t in p.tables]
    return "".join(parts) + "</section>"


def title_of(runs: Sequence[RunData]) -> str:
    if len(runs) == 1:
        r = runs[0]
        who = r.id if r.label == r.id else f"{r.label} ({r.id})"
        return f"trajscope report: {who}, {r.workload or 'no workload'}"
    workloads = ", ".join(dict.fromkeys(r.workload or "no workload" for r in runs))
    return f"trajscope comparison of {len(runs)} runs ({', '.join(r.id for r in runs)}), {workloads}"


def overview(runs: Sequence[RunData], differ: Sequence[str]) -> str:
    head, rows = overview_rows(runs)
    parts = ['<section id="overview"><h2>Overview</h2>', table(Table(head, rows), key_column=True)]
    if len(runs) > 1 and differ:
        h, r = config_rows(runs, differ)
        parts.append("<h3>Config values that differ</h3>" + table(Table(h, r), key_column=True))
    h, r = config_rows(runs)
    body = key_values(r) if len(runs) == 1 else table(Table(h, r), key_column=True)
    parts.append(f"<details{' open' if len(runs) == 1 else ''}><summary>Config ({len(r)} values)</summary>"
                 f"{body}</details>")
    h, r, total = event_rows(runs)
    if total:
        more = f"the first {len(r)} of {total}" if total > len(r) else str(total)
        parts.append(f"<details><summary>Event log ({more} events)</summary>{table(Table(h, r))}</details>")
    return "".join(parts) + "</section>"


def page(runs: Sequence[RunData], panels: Sequence[Panel], version: str, differ: Sequence[str] | None = None) -> str:
    """The whole HTML page."""
    differ = label_runs(list(runs)) if differ is None else differ
    title = title_of(runs)
    status = "".join(f'<div class="status {escape(r.status)}"><strong>{escape(r.label)}</strong>: '
                     f"{escape(status_sentence(r))}</div>" for r in runs)
    links = [("overview", "Overview")] + [(p.key, p.title) for p in panels]
    nav = "<nav>" + "".join(f'<a href="#{escape(k)}">{escape(t)}</a>' for k, t in links) + "</nav>"
    body = overview(runs, differ) + "".join(section(p) for p in panels)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="generator" content="trajscope {escape(version)}">'
            f'<link rel="icon" href="data:,"><title>{escape(title)}</title><style>{CSS}</style></head>\n'
            f'<body><header><h1>{escape(title)}</h1>'
            f'<p class="sub">Self-contained report written by trajscope {escape(version)}; '
            f"every figure is embedded, nothing is loaded from elsewhere.</p></header>"
            f"{status}{nav}{body}<footer>trajscope {escape(version)}</footer></body></html>\n")
