"""The run page's tables: predicted (sim) beside measured (real) with the signed % error.

A column exists only for a side the run has: a sim-only run shows predicted values alone, a
real-only run measured values alone, and the error column appears only with both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reports.band_format import contains, format_band
from reports.formatting import error_class, fmt, fmt_error, number, pct_error
from reports.html import Cell, table

SIDE_LABEL = {"sim": "predicted (sim)", "real": "measured (real)"}
SHORT_LABEL = {"sim": "predicted", "real": "measured"}


@dataclass(frozen=True)
class Row:
    label: str
    unit: str
    key: str
    measured: bool = True  # False: a prediction with no measured counterpart
    real_key: str | None = None  # the measured side's key when it differs

    def key_for(self, side: str) -> str | None:
        if side == "sim":
            return self.key
        return (self.real_key or self.key) if self.measured else None


def _latency_rows() -> list[Row]:
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E"}
    return [Row(f"{label} p{q}", "time", f"{key}_p{q}_s")
            for key, label in names.items() for q in (50, 90, 99)]


METRIC_ROWS: tuple[Row, ...] = (
    *_latency_rows(),
    Row("request throughput (req/s)", "float", "request_throughput_req_s"),
    Row("output throughput (tok/s)", "float", "output_throughput_tok_s"),
    Row("total token throughput (tok/s)", "float", "total_token_throughput_tok_s"),
    Row("KV blocks (num_blocks)", "int", "num_blocks"),
    Row("peak KV blocks used", "int", "kv_blocks_used_peak"),
    Row("peak KV usage", "pct", "kv_usage_peak"),
    Row("preemptions", "int", "total_preemptions"),
    Row("preempted requests", "int", "preempted_requests"),
    Row("max concurrency (running)", "int", "max_concurrency"),
    Row("max waiting", "int", "max_waiting"),
    Row("prefix-cache hit rate", "pct", "prefix_cache_hit_rate"),
    Row("completed requests", "int", "completed"),
    Row("rejected requests", "int", "rejected"),
    Row("duration (s)", "s", "duration_s"),
)
MEMORY_TERMS: tuple[tuple[str, str], ...] = (  # label, MemoryTerms key; they sum to the budget
    ("weights", "weights_bytes"), ("activation peak", "activation_peak_bytes"),
    ("non-torch", "non_torch_bytes"), ("CUDA graphs", "cuda_graph_bytes"),
    ("KV cache", "kv_cache_bytes"),
)
MEMORY_ROWS: tuple[Row, ...] = (
    Row("total memory (GiB)", "gib", "total_bytes"),
    Row("gpu_memory_utilization", "float", "gpu_memory_utilization"),
    Row("budget (GiB)", "gib", "budget_bytes"),
    *(Row(f"{label} (GiB)", "gib", key) for label, key in MEMORY_TERMS),
    Row("bytes per block", "int", "bytes_per_block"),
    Row("num_blocks", "int", "num_blocks"),
)
CAPACITY_ROWS: tuple[Row, ...] = (
    Row("starts", "int", "starts", False),
    Row("KV blocks (num_blocks)", "int", "num_blocks"),
    Row("block_size (tokens)", "int", "block_size", False),
    Row("KV cache tokens", "int", "kv_cache_tokens"),
    Row("KV cache (GiB)", "float", "kv_cache_gib", False),
    Row("max_model_len", "int", "max_model_len", False),
    Row("max concurrency at max_model_len", "x", "max_concurrency_at_max_len",
        real_key="max_concurrency"),
    Row("mean request length (tokens)", "int", "mean_request_len", False),
    Row("max concurrency at the mean length", "x", "max_concurrency_at_mean_len",
        False),
    Row("largest max_model_len that fits", "int", "largest_max_model_len", False),
)


def comparison_table(rows: tuple[Row, ...], values: dict[str, dict[str, Any]],
                     tid: str, bands: dict[str, dict[str, float]] | None = None) -> str:
    """`values`: side ("sim"/"real") -> that side's dict; one column per side present.
    `bands`: the predicted metrics' 5-95 % bands by key, shown as "value [p5–p95]", with a
    column saying whether the measured value falls in its band."""
    sides = [s for s in ("sim", "real") if values.get(s) is not None]
    both = len(sides) == 2
    banded = both and bool(bands)
    headers = ["", *(SIDE_LABEL[s] for s in sides)] + (["error"] if both else []) + \
        (["in band"] if banded else [])
    body = []
    for row in rows:
        got = {s: _lookup(values[s], row, s) for s in sides}
        if all(v is None for v in got.values()):
            continue
        band = (bands or {}).get(row.key) if "sim" in sides else None
        cells: list[Cell | str] = [row.label, *(
            _with_band(got[s], band, row.unit) if s == "sim" else fmt(got[s], row.unit)
            for s in sides)]
        if both:
            cells.append(_error_cell(got["sim"], got["real"], row.unit))
        if banded:
            cells.append(_in_band_cell(band, got["real"], row.unit))
        body.append(cells)
    return table(headers, body, css="compare", tid=tid)


def _with_band(value: Any, band: dict[str, float] | None, unit: str) -> str:
    return format_band(value, band, lambda v: fmt(v, unit))


def _in_band_cell(band: dict[str, float] | None, measured: Any, unit: str) -> Cell:
    if band is None or number(measured) is None:
        return Cell(fmt_error(None))
    inside = contains(band, number(measured), count=unit == "int")
    return Cell("yes" if inside else "no", css="good" if inside else "poor")


def _lookup(values: dict[str, Any], row: Row, side: str) -> Any:
    key = row.key_for(side)
    return values.get(key) if key else None


def _error_cell(predicted: Any, measured: Any, unit: str) -> Cell:
    if unit == "pct":  # a fraction: the error is the difference in points, not a ratio
        p, m = number(predicted), number(measured)
        if p is None or m is None:
            return Cell(fmt_error(None))
        return Cell(f"{(p - m) * 100:+.2f} pts")
    err = pct_error(predicted, measured)
    return Cell(fmt_error(err), css=error_class(err) or None)


def memory_sources_table(sim_memory: dict[str, Any] | None,
                         real_memory: dict[str, Any] | None) -> str:
    """Where each predicted term came from (exact, formula, profile, catalog)."""
    if not sim_memory or not sim_memory.get("sources"):
        return ""
    sources = sim_memory["sources"]
    rows = [(k.replace("_", " "), str(v)) for k, v in sources.items()]
    if real_memory and real_memory.get("source"):
        rows.append(("measured terms", str(real_memory["source"])))
    return table(["term", "source of the prediction"], rows, css="sources")
