"""The HTML shell every page shares: one self-contained file that opens offline from disk.

plotly.js is either embedded (a standalone run page) or referenced by a relative path to the one
`plotly.min.js` a sweep writes into its root. Nothing is ever fetched from the network: no CDN,
no web fonts, no images.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

PLOTLY_JS = "plotly.min.js"
EMBED = "embed"
PLOT_CONFIG = {"displaylogo": False, "responsive": True}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1f2328; background: #f6f8fa; }
main { max-width: 1280px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 1.5rem; margin: 8px 0 4px; } h2 { font-size: 1.15rem; margin: 0 0 8px; }
section { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: 14px 16px;
          margin: 14px 0; }
.meta { color: #57606a; margin: 2px 0; }
.note { color: #57606a; font-size: 0.85rem; margin: 6px 0 0; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border-bottom: 1px solid #e5e8eb; padding: 4px 10px; text-align: right;
         vertical-align: top; }
th { background: #f0f3f6; position: sticky; top: 0; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
td.msg { text-align: left; min-width: 220px; max-width: 340px; white-space: normal;
         color: #82071e; font-size: 0.78rem; }
.scroll { overflow: auto; max-height: 640px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.8rem;
         font-weight: 600; color: #fff; white-space: nowrap; }
.st-ok { background: #1a7f37; } .st-cannot_start { background: #bc4c00; }
.st-failed, .st-unreadable { background: #cf222e; } .st-unknown { background: #6e7781; }
.st-interrupted { background: #8250df; }
tr.row-cannot_start td { background: #fff4e5; }
tr.row-failed td, tr.row-unreadable td { background: #ffebe9; }
tr.row-interrupted td { background: #fbefff; } tr.row-warn td { background: #fff8c5; }
.warn { color: #7d4e00; font-size: 0.8rem; font-weight: 600; }
.alert { border: 2px solid #cf222e; background: #ffebe9; border-radius: 6px; padding: 12px 16px;
         margin: 14px 0; }
.alert.warn { border-color: #bc4c00; background: #fff4e5; }
.alert pre { white-space: pre-wrap; margin: 6px 0 0; font-size: 0.9rem; }
.good { color: #1a7f37; } .fair { color: #9a6700; } .poor { color: #cf222e; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-order="asc"]::after { content: " \\25B2"; }
table.sortable th[data-order="desc"]::after { content: " \\25BC"; }
.kv { display: flex; flex-wrap: wrap; gap: 4px 18px; font-size: 0.85rem; }
.kv span b { color: #57606a; font-weight: 500; }
a { color: #0969da; }
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); column-gap: 14px; }
@media (max-width: 1100px) { .grid { grid-template-columns: minmax(0, 1fr); } }
.grid > section { margin: 7px 0; min-width: 0; } .grid > section.wide { grid-column: 1 / -1; }
"""

SORT_JS = """
function kvCompare(a, b) {
  const x = Number(a), y = Number(b);
  if (!isNaN(x) && !isNaN(y)) return x - y;
  return a.localeCompare(b, undefined, {numeric: true});
}
document.querySelectorAll("table.sortable").forEach(table => {
  table.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
    const asc = th.dataset.order !== "asc";
    table.querySelectorAll("th").forEach(h => delete h.dataset.order);
    th.dataset.order = asc ? "asc" : "desc";
    const key = row => row.cells[col].dataset.sort ?? row.cells[col].textContent.trim();
    const rows = Array.from(table.tBodies[0].rows);
    rows.sort((r, s) => {
      const a = key(r), b = key(s);
      if (a === "" || b === "") return (a === "") - (b === "");  // blanks last
      return asc ? kvCompare(a, b) : kvCompare(b, a);
    });
    rows.forEach(row => table.tBodies[0].appendChild(row));
  }));
});
"""


@dataclass(frozen=True)
class Cell:
    """A table cell: its text, an optional raw sort key, CSS class and link target."""

    text: str
    sort: str | None = None
    css: str | None = None
    href: str | None = None
    raw_html: bool = False
    title: str | None = None  # shown on hover (e.g. the full text of a shortened message)


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def ensure_plotly_js(root: Path) -> Path:
    """Write plotly.min.js into `root` once; atomic, so parallel sweep points can share it."""
    root = Path(root)
    target = root / PLOTLY_JS
    js = get_plotlyjs()
    if target.is_file() and target.stat().st_size == len(js.encode("utf-8")):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{PLOTLY_JS}.{os.getpid()}.tmp"
    tmp.write_text(js, encoding="utf-8")
    os.replace(tmp, target)
    return target


def plotly_script(plotly_js: str | Path, page_dir: Path) -> str:
    """The <script> that loads plotly.js for a page written into `page_dir`.

    "embed": inline. A Path: a file on disk (e.g. from `ensure_plotly_js`), referenced from
    the page by its relative path. Any other str: a path relative to the page, used as given.
    The file must exist; URLs are refused (pages open offline)."""
    if isinstance(plotly_js, str) and plotly_js == EMBED:
        return f'<script type="text/javascript">{get_plotlyjs()}</script>'
    if "://" in str(plotly_js) or str(plotly_js).startswith("//"):
        raise ValueError(f"plotly_js={str(plotly_js)!r} is a URL: pages must open offline; "
                         f"pass {EMBED!r} or a path to {PLOTLY_JS}")
    if isinstance(plotly_js, Path):
        target = plotly_js
        src = Path(os.path.relpath(plotly_js.resolve(), Path(page_dir).resolve())).as_posix()
    else:
        target, src = Path(page_dir) / plotly_js, plotly_js
    if not target.is_file():
        raise FileNotFoundError(f"plotly.js not found at {target} (write it with "
                                "reports.html.ensure_plotly_js(sweep_dir))")
    return f'<script type="text/javascript" src="{esc(src)}"></script>'


def figure_div(fig: go.Figure, div_id: str) -> str:
    """A figure as a <div> (plotly.js loaded once by the page)."""
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                       config=PLOT_CONFIG, default_width="100%",
                       default_height=f"{fig.layout.height or 450}px")


def section(title: str, *content: str, note: str | None = None, sid: str | None = None,
            css: str | None = None) -> str:
    ident = f' id="{esc(sid)}"' if sid else ""
    ident += f' class="{esc(css)}"' if css else ""
    tail = f'<p class="note">{esc(note)}</p>' if note else ""
    return f"<section{ident}><h2>{esc(title)}</h2>{''.join(content)}{tail}</section>"


def grid(*sections: str) -> str:
    """Two sections a row where the page is wide enough (a "wide" one takes a full row).
    The columns are fixed, not auto-fit: plotly sizes each plot as its script runs, before
    the later sections exist."""
    return f'<div class="grid">{"".join(sections)}</div>' if sections else ""


def badge(status: str) -> str:
    return f'<span class="badge st-{esc(status)}">{esc(status.replace("_", " "))}</span>'


def key_values(items: Iterable[tuple[str, object]]) -> str:
    spans = "".join(f"<span><b>{esc(k)}</b> {esc(v)}</span>" for k, v in items)
    return f'<div class="kv">{spans}</div>'


def table(headers: Sequence[Cell | str], rows: Iterable[Sequence[Cell | str]], *,
          css: str = "", row_css: Sequence[str] | None = None, tid: str | None = None) -> str:
    """Headers given as Cell use its css (e.g. "text": left-aligned)."""
    ident = f' id="{esc(tid)}"' if tid else ""
    head = "".join(_th(h) for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{esc(row_css[i])}"' if row_css and row_css[i] else ""
        body.append(f"<tr{cls}>{''.join(_td(c) for c in row)}</tr>")
    return (f'<table class="{esc(css)}"{ident}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _th(header: Cell | str) -> str:
    if isinstance(header, Cell) and header.css:
        return f'<th class="{esc(header.css)}">{esc(header.text)}</th>'
    return f"<th>{esc(header.text if isinstance(header, Cell) else header)}</th>"


def _td(cell: Cell | str) -> str:
    cell = cell if isinstance(cell, Cell) else Cell(cell)
    attrs = "" if cell.sort is None else f' data-sort="{esc(cell.sort)}"'
    attrs += f' class="{esc(cell.css)}"' if cell.css else ""
    attrs += f' title="{esc(cell.title)}"' if cell.title else ""
    text = cell.text if cell.raw_html else esc(cell.text)
    if cell.href:
        text = f'<a href="{esc(cell.href)}">{text}</a>'
    return f"<td{attrs}>{text}</td>"


def page(title: str, body: Sequence[str], plotly_tag: str, *, sortable: bool = False) -> str:
    script = f"<script>{SORT_JS}</script>" if sortable else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style>{plotly_tag}</head>"
            f"<body><main>{''.join(body)}</main>{script}</body></html>\n")
