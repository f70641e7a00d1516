"""The run page: one run folder -> report.html, predicted beside measured.

Sections, each only when its data exist: status / error, a warning when requests were rejected
or left unfinished (counts and the commonest rejection reasons), serving metrics, latency CDFs,
KV usage over time, per-request parity (sim and real both), memory terms, capacity plan,
configuration.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from reports.aggregate import counts_warning, side_metrics
from reports.html import EMBED, badge, esc, figure_div, key_values, page, plotly_script, section
from reports.metrics import STEP_COLUMNS, request_latencies
from reports.plots import kv_timeline, latency_cdfs, memory_bars, request_parity
from reports.run_folder import REPORT, SOURCES, RunFolder, iter_steps, read_run
from reports.run_tables import (
    CAPACITY_ROWS,
    MEMORY_ROWS,
    METRIC_ROWS,
    comparison_table,
    memory_sources_table,
)
from reports.timeline import STEP_BATCH, KvTimelines

ALERT_TITLE = {"cannot_start": "Cannot start", "failed": "Run failed",
               "interrupted": "Interrupted: what was finished is kept"}
TOP_REASONS = 3
# Numbers that differ request by request in the scheduler's reasons, masked to group them.
_PER_REQUEST = re.compile(r"(prompt of|needs) \d+")


def write_run_page(run_dir: Path, plotly_js: str | Path = EMBED,
                   timelines: KvTimelines | None = None) -> Path:
    """(Re)write `run_dir`/report.html. `plotly_js`: "embed" (a standalone page), a Path to a
    shared plotly.min.js on disk (see `reports.html.ensure_plotly_js`), or a str path relative
    to the page. `timelines`: built while the steps were written (else read back)."""
    run = read_run(Path(run_dir), steps=False)  # the timeline reads them batch by batch
    out = run.path / REPORT
    html = render_run_page(run, plotly_script(plotly_js, run.path), timelines)
    out.write_text(html, encoding="utf-8")
    return out


def render_run_page(run: RunFolder, plotly_tag: str,
                    timelines: KvTimelines | None = None) -> str:
    s = run.summary
    body = [_header(run), _alert(s), requests_alert(run), _metrics_section(s),
            *_record_sections(run, timelines),
            _memory_section(s), _capacity_section(s), _config_section(s)]
    return page(f"kvtwin run {run.path.name}: {_title(s)}", [b for b in body if b], plotly_tag)


def side(summary: dict[str, Any], name: str, part: str) -> dict[str, Any] | None:
    """summary[name][part] when present (e.g. side(s, "sim", "memory"))."""
    found = (summary.get(name) or {}).get(part)
    return found if isinstance(found, dict) and found else None


def _title(s: dict[str, Any]) -> str:
    cfg = s.get("config") or {}
    return f"{cfg.get('model', '?')} on {cfg.get('hardware', '?')}"


def _header(run: RunFolder) -> str:
    s, cfg = run.summary, run.summary.get("config") or {}
    predictor = side(s, "sim", "predictor") or {}
    device = side(s, "real", "device") or {}
    workload = cfg.get("workload") or {}
    facts = [("status", None), ("mode", s.get("mode", "?")),
             ("workload", workload.get("name", "?")), ("folder", run.path.name)]
    if predictor:
        facts.append(("predictor", f"{predictor.get('kind')} ({predictor.get('source')})"))
    if device:
        facts.append(("device", device.get("name", "?")))
    meta = " &middot; ".join(badge(run.status) if v is None else f"{esc(k)}: {esc(v)}"
                             for k, v in facts)
    return f"<h1>kvtwin run: {esc(_title(s))}</h1><p class='meta'>{meta}</p>"


def _alert(s: dict[str, Any]) -> str:
    status = str(s.get("status", "unknown"))
    if status in ALERT_TITLE:
        kind = f": {s['error_type']}" if s.get("error_type") else ""
        css = "alert" if status == "failed" else "alert warn"
        trace = s.get("traceback")
        details = (f"<details><summary>traceback</summary><pre>{esc(trace)}</pre></details>"
                   if trace else "")
        return (f'<div class="{css}" id="run-error"><strong>{ALERT_TITLE[status]}{esc(kind)}'
                f"</strong><pre>{esc(s.get('error') or 'no error message recorded')}</pre>"
                f"{details}</div>")
    predicted = side(s, "sim", "memory") or {}
    if predicted.get("error") and s.get("real"):
        return ('<div class="alert warn" id="run-error"><strong>The simulator predicted this '
                f"configuration cannot start</strong><pre>{esc(predicted['error'])}</pre></div>")
    return ""


def requests_alert(run: RunFolder) -> str:
    """A banner when a side rejected or left unfinished any request: its counts, then the
    commonest rejection reasons (requests.parquet's finish_reason, per-request numbers masked).
    """
    sides = {side: text for side, m in side_metrics(run.summary).items()
             if (text := counts_warning(m))}
    if not sides:
        return ""
    items = []
    for side, text in sides.items():
        reasons = "".join(f"<li>{n:,} &times; {esc(reason)}</li>"
                          for reason, n in rejection_reasons(run, side))
        label = f"{side}: " if len(sides) > 1 or len(side_metrics(run.summary)) > 1 else ""
        items.append(f"<p>{esc(label + text)}</p>" + (f"<ul>{reasons}</ul>" if reasons else ""))
    return ('<div class="alert warn" id="requests-warning"><strong>Not every request '
            "completed</strong>" + "".join(items) + "</div>")


def rejection_reasons(run: RunFolder, side: str) -> list[tuple[str, int]]:
    """The commonest reasons the side's rejected requests give, most frequent first."""
    reqs, _ = run.side(side)
    if reqs.empty or "rejected" not in reqs or "finish_reason" not in reqs:
        return []
    rejected = reqs["rejected"].astype("boolean").fillna(False).astype(bool)
    reasons = reqs.loc[rejected, "finish_reason"].dropna().astype(str)
    masked = reasons.str.replace(_PER_REQUEST, lambda m: f"{m.group(1)} N", regex=True)
    counts = masked.value_counts()
    return [(str(r), int(n)) for r, n in counts.head(TOP_REASONS).items()]


def _served(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each side's metrics, for the sides that served anything (ran at least one step)."""
    found = {name: side(s, name, "metrics") for name in SOURCES}
    return {name: m for name, m in found.items()
            if m and ((m.get("num_steps") or 0) > 0 or (m.get("completed") or 0) > 0)}


def _metrics_section(s: dict[str, Any]) -> str:
    served = _served(s)
    if not served:
        return ""
    note = ("Error = (predicted - measured) / measured; a rate's error is the difference in "
            "points." if len(served) == 2 else None)
    bands = sim_bands(s)
    if bands:
        note = (note + " " if note else "") + (
            f"Predicted values carry their 5-95 % band over {bands['replicates']} seeded "
            "replicates (step-time residuals and machine-to-machine spread): "
            "point [p5–p95].")
    table = comparison_table(METRIC_ROWS, served, "summary-table",
                             (bands or {}).get("metrics"))
    return section("Serving metrics", table, note=note, sid="summary")


def sim_bands(s: dict[str, Any]) -> dict[str, Any] | None:
    """summary["sim"]["bands"] when it holds bands (not None, not skipped)."""
    bands = side(s, "sim", "bands")
    return bands if bands and bands.get("metrics") else None


def _record_sections(run: RunFolder, built: KvTimelines | None) -> list[str]:
    lat = {}
    for name in SOURCES:
        reqs, _ = run.side(name)
        if not reqs.empty:
            lat[name] = request_latencies(reqs)
    out = []
    if lat:
        cdf = (sim_bands(run.summary) or {}).get("cdf")
        out.append(section("Latency", figure_div(latency_cdfs(lat, cdf), "plot-latency-cdf")))
    timelines = (built or _read_timelines(run)).frames()
    if timelines:
        out.append(_timeline_section(run.summary, timelines))
    if "sim" in lat and "real" in lat:
        out.append(section("Predicted vs measured per request",
                           figure_div(request_parity(lat["sim"], lat["real"]), "plot-parity")))
    return out


def _read_timelines(run: RunFolder) -> KvTimelines:
    timelines = KvTimelines(STEP_BATCH)
    for batch in iter_steps(run.path, list(STEP_COLUMNS), STEP_BATCH):
        timelines.add(batch)
    return timelines


def _timeline_section(s: dict[str, Any], timelines: dict[str, pd.DataFrame]) -> str:
    blocks = {name: _num_blocks(s, name) for name in timelines}
    fig = kv_timeline(timelines, blocks)
    return section("KV cache over time", figure_div(fig, "plot-kv-timeline"),
                   note="Snapshots taken right after each step is scheduled; long runs are "
                        "thinned to the peak of each time bin.")


def _num_blocks(s: dict[str, Any], name: str) -> Any:
    metrics = side(s, name, "metrics") or {}
    memory = side(s, name, "memory") or {}
    return metrics.get("num_blocks", memory.get("num_blocks"))


def _memory_section(s: dict[str, Any]) -> str:
    memories = {name: m for name in SOURCES if (m := side(s, name, "memory"))}
    if not memories:
        return ""
    return section("Memory at start-up", figure_div(memory_bars(memories), "plot-memory"),
                   comparison_table(MEMORY_ROWS, memories, "memory-table"),
                   memory_sources_table(memories.get("sim"), memories.get("real")),
                   note="budget = total x gpu_memory_utilization; KV cache = budget - weights "
                        "- activation peak - non-torch - CUDA graphs.")


def _capacity_section(s: dict[str, Any]) -> str:
    values = {"sim": side(s, "sim", "capacity"), "real": side(s, "real", "memory")}
    if not values["sim"]:
        return ""
    predictor = side(s, "sim", "predictor") or {}
    facts = key_values([("step-time predictor", predictor.get("kind", "?")),
                        ("source", predictor.get("source", "?"))])
    return section("Capacity plan", facts,
                   comparison_table(CAPACITY_ROWS, values, "capacity-table"), sid="capacity")


def _config_section(s: dict[str, Any]) -> str:
    cfg = s.get("config") or {}
    parts = []
    for title, values in (("engine", cfg.get("engine")), ("workload", cfg.get("workload")),
                          ("trace source", s.get("trace")), ("versions", s.get("versions"))):
        if isinstance(values, dict) and values:
            parts.append(f"<p class='meta'>{esc(title)}</p>" + key_values(
                (k, _plain(v)) for k, v in values.items()))
    others = {k: v for k, v in cfg.items() if k not in ("engine", "workload")}
    if others:
        parts.insert(0, key_values((k, _plain(v)) for k, v in others.items()))
    return section("Configuration", *parts) if parts else ""


def _plain(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)
