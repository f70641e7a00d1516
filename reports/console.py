"""What a run and a sweep print on the console: one or two lines each, and the exit code.

    console_summary(summary)        after each run (summary.json's dict)
    sweep_status_line(sweep_dir)    after a sweep: the line and the exit code
    format_metrics(metrics, ...)    `python -m sim`: the twin's metrics in a few lines
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from reports.aggregate import count, read_points, share, side_metrics
from reports.band_format import format_band
from reports.formatting import fmt, number

NAMED_STATUSES = ("ok", "cannot_start", "failed", "interrupted")
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
LATENCIES = (("TTFT", "ttft", (50, 99)), ("TPOT", "tpot", (50, 99)), ("E2E", "e2e", (99,)))


def console_summary(summary: dict[str, Any]) -> str:
    """`[status] sim: 960 of 1,000 completed, 40 rejected (4.0%), 0 unfinished`, then a line of
    the main latencies and throughput per side that served requests; an error's first line
    replaces the counts where no side saw a request."""
    status = str(summary.get("status", "unknown"))
    sides = side_metrics(summary)
    head = " | ".join(f"{side}: {counts_text(m)}" for side, m in sides.items())
    error = first_line(summary.get("error"))
    if error and (status != "ok" or not head):
        head = f"{head} | {error}" if head else error
    lines = [f"[{status}] {head or _no_requests(summary)}"]
    latency = " | ".join(f"{side}: {latency_text(m, side_bands(summary, side))}"
                         for side, m in sides.items() if count(m, "completed"))
    if latency:
        lines.append(latency)
    return "\n".join(lines)


def _no_requests(summary: dict[str, Any]) -> str:
    """What a run that served no requests did (a calibration, a bench)."""
    calibration, bench = summary.get("calibration") or {}, summary.get("bench") or {}
    if calibration:
        return f"calibration profile: {calibration['profile']}"
    if bench:
        return f"bench: {bench['path']}"
    return "no request ran"


def counts_text(metrics: dict[str, Any]) -> str:
    total = count(metrics, "num_requests")
    done, rejected, unfinished = (count(metrics, k)
                                  for k in ("completed", "rejected", "unfinished"))
    rejected_text = f"{rejected:,} rejected" + (f" ({share(rejected, total)})" if rejected else "")
    return (f"{done:,} of {total:,} completed, {rejected_text}, "
            f"{unfinished:,} unfinished")


def side_bands(summary: dict[str, Any], side: str) -> dict[str, Any]:
    """The side's prediction bands by metric ({} where it has none)."""
    bands = (summary.get(side) or {}).get("bands") or {}
    return bands.get("metrics") or {}


def latency_text(metrics: dict[str, Any], bands: dict[str, Any] | None = None) -> str:
    """`TTFT p50 29.8 ms [6.17 ms–345 ms] / p99 ...`: the band, where there is one."""
    parts, bands = [], bands or {}
    for label, key, quantiles in LATENCIES:
        values = " / ".join(
            f"p{q} " + format_band(metrics.get(f"{key}_p{q}_s"), bands.get(f"{key}_p{q}_s"),
                                   lambda v: fmt(v, "time"))
            for q in quantiles)
        parts.append(f"{label} {values}")
    rate = number(metrics.get("output_throughput_tok_s"))
    if rate is not None:
        parts.append(f"{fmt(rate, 'float')} output tok/s")
    return ", ".join(parts)


def first_line(text: Any) -> str:
    lines = str(text).strip().splitlines() if text else []
    return lines[0][:200] if lines else ""


def sweep_status_line(sweep_dir: str | Path) -> tuple[str, int]:
    """("sweep DIR: 13 points: 10 ok (2 with rejected or unfinished requests), 2 cannot start,
    1 failed, 0 interrupted", exit code): 130 when a point was interrupted, else 1 when one
    failed (or its summary.json is unreadable), else 0 (a point that cannot start is a result).
    """
    root = Path(sweep_dir)
    try:
        points = read_points(root)
    except OSError as err:
        return f"sweep {root}: unreadable ({err})", EXIT_FAILED
    if points.empty:
        return f"sweep {root}: no points (no summary.json under it)", EXIT_FAILED
    counts = Counter(points["status"])
    code = EXIT_INTERRUPTED if counts["interrupted"] else \
        EXIT_FAILED if any(s not in ("ok", "cannot_start") for s in counts) else EXIT_OK
    return f"sweep {root}: {status_summary(points)}", code


def status_summary(points: pd.DataFrame) -> str:
    """"13 points: 10 ok (2 with rejected or unfinished requests), 2 cannot start, 1 failed,
    0 interrupted" (and any other status that occurs)."""
    counts = Counter(points["status"])
    flagged = int((points["status"].eq("ok") & points.get(
        "warning", pd.Series(index=points.index, dtype=object)).notna()).sum())
    parts = []
    for status in [*NAMED_STATUSES, *sorted(set(counts) - set(NAMED_STATUSES))]:
        text = f"{counts[status]} {status.replace('_', ' ')}"
        if status == "ok" and flagged:
            text += f" ({flagged} with rejected or unfinished requests)"
        parts.append(text)
    return f"{len(points)} points: " + ", ".join(parts)


def format_metrics(m: dict[str, Any], predictor: dict[str, str], simulated_s: float,
                   wall_s: float) -> str:
    """Requests, latency percentiles, throughput, KV usage and the simulation's speed."""
    lines = [f"predictor      {predictor['kind']}: {predictor['source']}",
             f"requests       {m['completed']} completed, {m['rejected']} rejected, "
             f"{m['unfinished']} unfinished, {m['total_preemptions']} preemptions"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        values = [(p, m.get(f"{name}_{p}_s")) for p in ("p50", "p90", "p99")]
        lines.append(f"{name.upper():<14} " + "  ".join(f"{p} {_ms(v)}" for p, v in values))
    speed = simulated_s / wall_s if wall_s else 0.0
    lines += [
        f"throughput     {_num(m.get('request_throughput_req_s'))} req/s, "
        f"{_num(m.get('output_throughput_tok_s'))} output tok/s",
        f"KV usage       peak {_num(m.get('kv_usage_peak'), 3)}, max concurrency "
        f"{m.get('max_concurrency')}, prefix hit rate {_num(m.get('prefix_cache_hit_rate'), 3)}",
        f"simulated      {simulated_s:,.1f} s in {wall_s:,.2f} s wall ({speed:,.0f}x real "
        f"time), {m.get('num_steps', 0):,} steps",
    ]
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{1000 * v:,.1f} ms"


def _num(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"
