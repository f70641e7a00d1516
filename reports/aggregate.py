"""A sweep's points as one table: one row per run folder under the sweep directory.

Every folder with a summary.json is a point, whatever its status (ok, cannot_start, failed; a
summary.json that cannot be parsed is "unreadable"), so a partial sweep aggregates whatever
exists. Only summary.json is read: the records are not needed for the table.

Columns: point, status, warning, model, hardware, block_size, max_model_len,
gpu_memory_utilization, every other configuration field that varies across points,
`sim_<metric>` (predicted), `real_<metric>` (measured), `err_<metric>_pct` (signed prediction
error), `sim_<metric>_p5` / `_p95` (the predicted 5-95 % band, where the run has bands), error,
error_type, mode, report. Metric columns with no value at any point are left out (a sim-only
sweep has no real_ or err_ columns). The request counts (completed, rejected, unfinished) are
metrics too; `warning` says, per side, when a point rejected or left unfinished any request
("12% rejected (120 of 1,000), 3 unfinished"), empty otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reports.formatting import number, pct_error
from reports.run_folder import REPORT, SOURCES, SUMMARY, find_runs

X_AXIS, Y_AXIS, FACET = "block_size", "gpu_memory_utilization", "max_model_len"
ALWAYS = ("model", "hardware", X_AXIS, FACET, Y_AXIS)
META = ("point", "status", "warning", "error", "error_type", "mode", "report")
TAIL = ("error", "error_type", "mode", "report")
SKIPPED_CONFIG = ("overrides",)  # Hydra's override list: repeats the varying fields
SIDE_PREFIX = {"sim": "sim_", "real": "real_"}


@dataclass(frozen=True)
class PointMetric:
    name: str
    label: str
    unit: str
    sim: tuple[str, str]  # (part of summary["sim"], key)
    real: tuple[str, str]  # (part of summary["real"], key)
    error: bool = True  # has a prediction-error column
    count: bool = False  # a request count: shown whether or not the side ran a step


POINT_METRICS: tuple[PointMetric, ...] = (
    PointMetric("num_blocks", "KV blocks", "int", ("memory", "num_blocks"),
                ("memory", "num_blocks")),
    PointMetric("max_concurrency", "max concurrency at max_model_len", "x",
                ("capacity", "max_concurrency_at_max_len"), ("memory", "max_concurrency")),
    PointMetric("peak_running", "peak running requests", "int", ("metrics", "max_concurrency"),
                ("metrics", "max_concurrency"), error=False),
    PointMetric("throughput_tok_s", "output throughput (tok/s)", "float",
                ("metrics", "output_throughput_tok_s"), ("metrics", "output_throughput_tok_s")),
    PointMetric("ttft_p99_s", "p99 TTFT", "time", ("metrics", "ttft_p99_s"),
                ("metrics", "ttft_p99_s")),
    PointMetric("e2e_p99_s", "p99 E2E", "time", ("metrics", "e2e_p99_s"),
                ("metrics", "e2e_p99_s")),
    PointMetric("preemptions", "preemptions", "int", ("metrics", "total_preemptions"),
                ("metrics", "total_preemptions"), error=False),
    *(PointMetric(key, f"{key} requests", "int", ("metrics", key), ("metrics", key),
                  error=False, count=True) for key in ("completed", "rejected", "unfinished")),
)
METRICS_BY_NAME = {m.name: m for m in POINT_METRICS}


def collect_points(sweep_dir: Path) -> pd.DataFrame:
    """One row per run folder under `sweep_dir` (see the module docstring for the columns)."""
    return select_columns(read_points(sweep_dir))


def read_points(sweep_dir: Path) -> pd.DataFrame:
    """Every column for every point, constant configuration fields included."""
    root = Path(sweep_dir)
    rows = [point_row(root, path) for path in find_runs(root)]
    return pd.DataFrame(rows, columns=_ordered(rows)) if rows else pd.DataFrame()


def point_row(root: Path, path: Path) -> dict[str, Any]:
    rel = path.relative_to(root).as_posix()
    row: dict[str, Any] = {"point": rel, "report": f"{rel}/{REPORT}"}
    try:
        summary = json.loads((path / SUMMARY).read_text())
    except (OSError, ValueError) as err:
        return {**row, "status": "unreadable", "error": f"{SUMMARY} unreadable: {err}"}
    row.update(status=str(summary.get("status", "unknown")), error=summary.get("error"),
               error_type=summary.get("error_type"), mode=summary.get("mode"),
               warning=request_warning(summary))
    row.update(config_fields(summary.get("config") or {}))
    row.update(metric_fields(summary))
    return row


def config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """Flat configuration: engine fields by name, workload fields as workload.<key>."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in SKIPPED_CONFIG:
            continue
        if key == "engine" and isinstance(value, dict):
            out.update({k: _scalar(v) for k, v in value.items()})
        elif key == "workload" and isinstance(value, dict):
            out["workload"] = value.get("name")
            out.update(_flatten("workload", {k: v for k, v in value.items() if k != "name"}))
        else:
            out[key] = _scalar(value)
    return out


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k2: v2 for k, v in value.items() for k2, v2 in _flatten(f"{prefix}.{k}", v).items()}
    return {prefix: _scalar(value)}


def _scalar(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value


def metric_fields(summary: dict[str, Any]) -> dict[str, Any]:
    """sim_<name>, real_<name> and err_<name>_pct for every point metric."""
    out: dict[str, Any] = {}
    bands = ((summary.get("sim") or {}).get("bands") or {}).get("metrics") or {}
    for metric in POINT_METRICS:
        for side in SOURCES:
            out[f"{side}_{metric.name}"] = _side_value(summary, side, metric)
        band = bands.get(metric.sim[1]) if metric.sim[0] == "metrics" else None
        if band and not np.isnan(out[f"sim_{metric.name}"]):
            out[f"sim_{metric.name}_p5"], out[f"sim_{metric.name}_p95"] = band["p5"], band["p95"]
        if metric.error:
            out[f"err_{metric.name}_pct"] = _or_nan(
                pct_error(out[f"sim_{metric.name}"], out[f"real_{metric.name}"]))
    return out


def _side_value(summary: dict[str, Any], side: str, metric: PointMetric) -> float:
    part, key = metric.sim if side == "sim" else metric.real
    found = (summary.get(side) or {}).get(part) or {}
    if metric.count and not count(found, "num_requests"):
        return np.nan  # no request came in: the configuration never started
    if part == "metrics" and not metric.count and not served(found):
        return np.nan  # nothing ran: no latency, throughput or peak to report
    return _or_nan(number(found.get(key)))


def side_metrics(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each side's metrics that saw at least one request."""
    found = {side: (summary.get(side) or {}).get("metrics") for side in SOURCES}
    return {side: m for side, m in found.items()
            if isinstance(m, dict) and count(m, "num_requests") > 0}


def count(metrics: dict[str, Any], key: str) -> int:
    """A count from summary.json's metrics; 0 when absent or not a number."""
    return int(number(metrics.get(key)) or 0)


def request_warning(summary: dict[str, Any]) -> str | None:
    """"12% rejected (120 of 1,000), 3 unfinished" per side that rejected or left unfinished
    any request (sides named when both ran); None when every request completed."""
    sides = side_metrics(summary)
    parts = [(side, text) for side, m in sides.items() if (text := counts_warning(m))]
    if not parts:
        return None
    return "; ".join(f"{side}: {text}" if len(sides) > 1 else text for side, text in parts)


def counts_warning(metrics: dict[str, Any]) -> str:
    total = count(metrics, "num_requests")
    rejected, unfinished = count(metrics, "rejected"), count(metrics, "unfinished")
    parts = []
    if rejected:
        parts.append(f"{share(rejected, total)} rejected ({rejected:,} of {total:,})")
    if unfinished:
        parts.append(f"{unfinished:,} unfinished")
    return ", ".join(parts)


def share(part: int, total: int) -> str:
    """A percentage as a reader wants it: 12%, 4.5%, <0.1%."""
    pct = 100.0 * part / total if total else 0.0
    if 0 < pct < 0.1:
        return "<0.1%"
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.1f}%"


def served(metrics: dict[str, Any]) -> bool:
    """Did this side run at least one step (or complete a request)?"""
    return (metrics.get("num_steps") or 0) > 0 or (metrics.get("completed") or 0) > 0


def _or_nan(value: float | None) -> float:
    return np.nan if value is None else value


def _ordered(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = dict.fromkeys(("point", "status", "warning", *ALWAYS))  # always
    for row in rows:
        seen.update(dict.fromkeys(row))
    head = ["point", "status", "warning", *ALWAYS]
    metrics = [c for c in seen if is_metric(c)]
    tail = [c for c in TAIL if c in seen]
    middle = [c for c in seen if c not in head and c not in tail and c not in metrics]
    return head + middle + metrics + tail


def is_metric(column: str) -> bool:
    return column.startswith(("sim_", "real_", "err_"))


def config_columns(points: pd.DataFrame) -> list[str]:
    return [c for c in points.columns if c not in META and not is_metric(c)]


def varies(points: pd.DataFrame, column: str) -> bool:
    return points[column].astype(str).nunique(dropna=False) > 1


def select_columns(points: pd.DataFrame) -> pd.DataFrame:
    """Keep the always-shown and the varying configuration, and metrics with any value."""
    keep = [c for c in points.columns
            if c in META or c in ALWAYS
            or (is_metric(c) and points[c].notna().any())
            or (not is_metric(c) and varies(points, c))]
    return points[keep]


def common_settings(points: pd.DataFrame) -> dict[str, Any]:
    """The configuration fields every readable point shares."""
    readable = points[points["status"] != "unreadable"] if "status" in points else points
    if readable.empty:
        return {}
    return {c: readable[c].iloc[0] for c in config_columns(readable) if not varies(readable, c)}
