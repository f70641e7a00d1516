"""The sweep page: every point of a sweep directory -> sweep.html + points.csv in its root.

plotly.min.js is written once into the sweep root; the sweep page and the point pages load it by
relative path. Point pages that are missing are written (all of them with rewrite_points).
Works on partial sweeps: whatever run folders exist are the points.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from reports.aggregate import (
    FACET,
    POINT_METRICS,
    X_AXIS,
    Y_AXIS,
    common_settings,
    config_columns,
    is_metric,
    read_points,
    select_columns,
    varies,
)
from reports.console import status_summary
from reports.formatting import error_class, fmt, fmt_error, number
from reports.html import (
    Cell,
    badge,
    ensure_plotly_js,
    esc,
    figure_div,
    grid,
    key_values,
    page,
    plotly_script,
    section,
    table,
)
from reports.run_folder import REPORT, SUMMARY
from reports.run_page import write_run_page
from reports.run_tables import SHORT_LABEL
from reports.sweep_plots import (
    Facets,
    feasibility_map,
    metric_heatmap,
    parity_metrics,
    points_parity,
)

SWEEP_PAGE = "sweep.html"
POINTS_CSV = "points.csv"
METRICS = {m.name: m for m in POINT_METRICS}
AXES = (X_AXIS, FACET, Y_AXIS)
MESSAGE_CHARS = 180


@dataclass
class SweepReport:
    page: Path
    csv: Path
    plotly_js: Path
    point_pages: list[Path] = field(default_factory=list)
    page_errors: dict[str, str] = field(default_factory=dict)  # point -> why no page

    @property
    def written(self) -> list[Path]:
        return [*self.point_pages, self.plotly_js, self.csv, self.page]


def write_sweep_report(sweep_dir: Path, rewrite_points: bool = False) -> Path:
    """Write sweep.html, points.csv and plotly.min.js into `sweep_dir`; returns sweep.html."""
    return build_sweep_report(sweep_dir, rewrite_points).page


def build_sweep_report(sweep_dir: Path, rewrite_points: bool = False) -> SweepReport:
    root = Path(sweep_dir)
    full = read_points(root)
    if full.empty:
        raise FileNotFoundError(f"no run folders under {root}: no {SUMMARY} found")
    report = SweepReport(root / SWEEP_PAGE, root / POINTS_CSV, ensure_plotly_js(root))
    write_point_pages(root, full, report, rewrite_points)
    points = select_columns(full)
    points.to_csv(report.csv, index=False)
    html = render_sweep_page(root, points, common_settings(full), report)
    report.page.write_text(html, encoding="utf-8")
    return report


def write_point_pages(root: Path, points: pd.DataFrame, report: SweepReport,
                      rewrite: bool) -> None:
    """A run page for each readable point that has none (each one, with `rewrite`)."""
    for point, status in zip(points["point"], points["status"], strict=True):
        if status == "unreadable" or ((root / point / REPORT).is_file() and not rewrite):
            continue
        try:
            report.point_pages.append(write_run_page(root / point, report.plotly_js))
        except Exception as err:  # one broken point must not cost the sweep its report
            report.page_errors[point] = f"{type(err).__name__}: {err}"


def render_sweep_page(root: Path, points: pd.DataFrame, common: dict[str, object],
                      report: SweepReport) -> str:
    body = [_header(root, points, common), _table_section(root, points, report)]
    body += _figure_sections(points)
    return page(f"kvtwin sweep {root.name}", body, plotly_script(report.plotly_js, root),
                sortable=True)


def _header(root: Path, points: pd.DataFrame, common: dict[str, object]) -> str:
    counts = Counter(points["status"])
    summary = " ".join(f"{badge(status)} {n}" for status, n in sorted(counts.items()))
    settings = key_values((k, v) for k, v in common.items()) if common else ""
    return (f"<h1>kvtwin sweep: {esc(root.name)}</h1>"
            f"<p class='meta'>{len(points)} points &middot; {summary}</p>"
            f"<p class='meta' id='sweep-status'>{esc(status_summary(points))}</p>"
            + (section("Settings shared by every point", settings) if settings else ""))


def _table_section(root: Path, points: pd.DataFrame, report: SweepReport) -> str:
    config = [c for c in config_columns(points) if c in AXES or varies(points, c)]
    metrics = [c for c in points.columns if is_metric(c)]
    headers = [Cell("point", css="text"), Cell("status", css="text"),
               Cell("message", css="text"), *config, *(metric_label(c) for c in metrics)]
    rows = [_row(root, point, config, metrics, report) for _, point in points.iterrows()]
    row_css = [f"row-{s}" + (" row-warn" if _warning(p) else "")
               for s, (_, p) in zip(points["status"], points.iterrows(), strict=True)]
    tbl = table(headers, rows, css="sortable", row_css=row_css, tid="points-table")
    return section("Points", f'<div class="scroll">{tbl}</div>', sid="points",
                   note="Click a column header to sort. Each point links to its run page; "
                        "error = (predicted - measured) / measured.")


def _row(root: Path, point: pd.Series, config: list[str], metrics: list[str],
         report: SweepReport) -> list[Cell | str]:
    rel = str(point["point"])
    href = f"{rel}/{REPORT}" if (root / rel / REPORT).is_file() else None
    message = point.get("error") if isinstance(point.get("error"), str) else ""
    if rel in report.page_errors:
        message = f"{message} (run page not written: {report.page_errors[rel]})".strip()
    cells: list[Cell | str] = [Cell(rel, href=href, css="text"), _status_cell(point),
                               _message_cell(message)]
    cells += [_config_cell(point[c]) for c in config]
    return cells + [_metric_cell(c, point[c]) for c in metrics]


def _warning(point: pd.Series) -> str:
    value = point.get("warning")
    return value if isinstance(value, str) else ""


def _status_cell(point: pd.Series) -> Cell:
    """The status badge; a point that rejected or left requests unfinished says so beside it
    ("ok, 12% rejected (120 of 1,000)")."""
    status, warning = str(point["status"]), _warning(point)
    text = badge(status) + (f'<span class="warn">, {esc(warning)}</span>' if warning else "")
    return Cell(text, sort=f"{status} {warning}".strip(), raw_html=True, css="text")


def _message_cell(message: str) -> Cell:
    """Shortened to a few lines; the full text on hover and on the point's page."""
    short = textwrap.shorten(message, MESSAGE_CHARS, placeholder=" …") if message else ""
    return Cell(short, css="msg", title=message if short != message else None)


def _config_cell(value: object) -> Cell:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return Cell("", sort="")
    v = number(value)
    return Cell(f"{value:g}" if isinstance(value, float) else str(value),
                sort=repr(v) if v is not None else str(value))


def _metric_cell(column: str, value: object) -> Cell:
    v = number(value)
    sort = "" if v is None else repr(v)
    if column.startswith("err_"):
        return Cell(fmt_error(v), sort=sort, css=error_class(v) or None)
    return Cell(fmt(v, METRICS[metric_name(column)].unit), sort=sort)


BAND_SUFFIXES = {"_p5": "5 %", "_p95": "95 %"}  # aggregate's band columns


def metric_name(column: str) -> str:
    """sim_ttft_p99_s / real_ttft_p99_s / err_ttft_p99_s_pct / sim_ttft_p99_s_p95 ->
    ttft_p99_s."""
    stem = column.split("_", 1)[1]
    if column.startswith("err_"):
        return stem.removesuffix("_pct")
    return next((stem.removesuffix(b) for b in BAND_SUFFIXES
                 if stem.endswith(b) and stem.removesuffix(b) in METRICS), stem)


def metric_label(column: str) -> str:
    side = column.split("_", 1)[0]
    prefix = "error" if side == "err" else SHORT_LABEL[side]
    name = metric_name(column)
    band = next((f" ({q} band)" for b, q in BAND_SUFFIXES.items()
                 if column.endswith(b) and column != f"{side}_{name}"), "")
    return f"{prefix} {METRICS[name].label}{band}"


def _figure_sections(points: pd.DataFrame) -> list[str]:
    facets = Facets.of(points)
    if facets.empty:  # no point has a block_size and a gpu_memory_utilization to place
        return []
    out = [section("Feasibility", figure_div(feasibility_map(points), "plot-feasibility"),
                   note="Green: starts (with its KV blocks); orange: cannot start; red: "
                        "failed or interrupted; ⚠: starts, but rejected or left unfinished "
                        "some requests. Hover a cell for the message.")]
    wide = "wide" if facets.shape[1] > 2 else None
    out.append(grid(*_value_maps(points, wide)))
    out.append(grid(*_error_maps(points, wide)))
    if parity_metrics(points):
        out.append(section("Predicted vs measured, all points",
                           figure_div(points_parity(points), "plot-parity-points")))
    return out


def _value_maps(points: pd.DataFrame, css: str | None) -> list[str]:
    """Per metric, the predicted values (the measured ones in a sweep with no sim side)."""
    out = []
    for metric in (m for m in POINT_METRICS if not m.count):  # counts: the table and map
        column = next((f"{s}_{metric.name}" for s in ("sim", "real")
                       if f"{s}_{metric.name}" in points.columns), None)
        if column:
            title = metric_label(column)
            fig = metric_heatmap(points, column, metric.unit)
            out.append(section(title[:1].upper() + title[1:],
                               figure_div(fig, f"plot-heatmap-{metric.name}"), css=css))
    return out


def _error_maps(points: pd.DataFrame, css: str | None) -> list[str]:
    out = []
    for metric in POINT_METRICS:
        column = f"err_{metric.name}_pct"
        if column in points.columns:
            fig = metric_heatmap(points, column, "float", diverging=True)
            out.append(section(f"Prediction {metric_label(column)}",
                               figure_div(fig, f"plot-error-{metric.name}"), css=css,
                               note="(predicted - measured) / measured; red: over-predicted, "
                                    "blue: under-predicted."))
    return out
