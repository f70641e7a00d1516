"""Import request logs (Azure LLM inference traces, any CSV) into traces, reporting every change.

Order of operations: parse times (seconds after the earliest row), keep the window
[start_s, start_s + duration_s), divide times by rate_scale (2 = twice the rate), then handle zero
lengths (`zero_lengths`: clamp to 1 or drop), then requests too long (a length over the schema's
MAX_LEN, or prompt_len + output_len over max_model_len; `too_long`: "cap" cuts prompt_len to
max_model_len - 1, then output_len to max_model_len - prompt_len, and refuses a length over
MAX_LEN, which no real request has, with a TraceError; "drop"; "error" raises a TraceError at
the first; "keep" keeps them for the scheduler to reject).
Arrival times count from the window start. request_id is the 0-based source row, so a request
keeps its id (and token ids) in any window. The file is read a chunk at a time; a bad cell is a
TraceError naming the file, its source row and column.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from workloads.bounds import LengthBounds
from workloads.errors import SpecError, TraceError, TraceImportWarning, check_number
from workloads.schema import MAX_LEN, MAX_STORED_LEN, Trace, base_meta
from workloads.streams import CHUNK_ROWS, check_file, csv_chunks, csv_header
from workloads.tokens import TokenSpec
from workloads.validate import make_trace

AZURE_COLUMNS = {"arrival_s": "TIMESTAMP", "prompt_len": "ContextTokens",
                 "output_len": "GeneratedTokens"}
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "datetime": None}
PASSTHROUGH = ("request_id", "prefix_group", "prefix_len", "conversation_id", "turn")
TOO_LONG_POLICIES = ("cap", "drop", "error", "keep")
ROW = "_source_row"


@dataclass
class ImportReport:
    """What an import kept, changed and dropped (never silent: also sent as a warning)."""

    source: str
    rows_read: int
    outside_window: int = 0
    zero_prompt: int = 0
    zero_output: int = 0
    zero_policy: str = "clamp"
    too_long: int = 0
    too_long_policy: str = "cap"
    too_long_limit: str = "max_model_len"
    capped_prompt: int = 0
    capped_output: int = 0
    kept: int = 0

    @property
    def dropped(self) -> int:
        return self.rows_read - self.outside_window - self.kept

    @property
    def changed(self) -> int:
        """Lengths clamped or capped plus rows dropped (the window is asked for: not counted)."""
        zero = self.zero_prompt + self.zero_output if self.zero_policy == "clamp" else 0
        capped = self.capped_prompt + self.capped_output
        return self.dropped + zero + capped

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dropped": self.dropped}

    def __str__(self) -> str:
        zero = "clamped to 1" if self.zero_policy == "clamp" else "dropped"
        return (f"{self.source}: read {self.rows_read}, kept {self.kept} "
                f"({self.outside_window} outside the window, {self.dropped} dropped); "
                f"zero prompt {self.zero_prompt} / zero output {self.zero_output} ({zero}); "
                f"over {self.too_long_limit} {self.too_long} ({self.too_long_policy}: "
                f"{self.capped_prompt} prompts and {self.capped_output} outputs capped)")


def import_azure(path: str | Path, **options: Any) -> tuple[Trace, ImportReport]:
    """Azure LLM inference trace (2023 conv/code): TIMESTAMP, ContextTokens, GeneratedTokens.

    Options as import_csv (except columns and time_unit).
    """
    return import_csv(path, columns=AZURE_COLUMNS, time_unit="datetime", kind="azure", **options)


def import_csv(path: str | Path, *, columns: Mapping[str, str], time_unit: str = "s",
               start_s: float = 0.0, duration_s: float | None = None, rate_scale: float = 1.0,
               max_model_len: int | None = None,
               too_long: Literal["cap", "drop", "error", "keep"] = "cap",
               zero_lengths: Literal["clamp", "drop"] = "clamp", seed: int = 0,
               tokens: TokenSpec | None = None, kind: str = "csv",
               chunk_rows: int = CHUNK_ROWS) -> tuple[Trace, ImportReport]:
    """A CSV log mapped by `columns` (trace field -> source column; arrival_s, prompt_len and
    output_len are required, request_id / prefix / conversation fields optional).

    time_unit: "s", "ms", "us" (numbers) or "datetime" (timestamps). Returns the trace and the
    ImportReport; a TraceImportWarning repeats the report when any row was changed or dropped.
    """
    window = _check_options(columns, time_unit, start_s, duration_s, rate_scale, max_model_len,
                            too_long, zero_lengths)
    path = Path(path)
    check_file(path, "CSV")
    try:
        df = _read_source(path, columns, time_unit, chunk_rows)
        report = ImportReport(str(path), len(df), zero_policy=zero_lengths,
                              too_long_policy=too_long,
                              too_long_limit="MAX_LEN" if max_model_len is None
                              else "max_model_len")
        df = _windowed(df, start_s, window, rate_scale, report)
        df = _zero_lengths(df, zero_lengths, report)
        df = _too_long(df, LengthBounds(max_model_len, "keep"), too_long, report, columns)
        report.kept = len(df)
        if report.changed:
            warnings.warn(TraceImportWarning(str(report)), stacklevel=3 if kind == "azure" else 2)
        options = {"start_s": start_s, "duration_s": duration_s, "rate_scale": rate_scale,
                   "max_model_len": max_model_len, "too_long": too_long,
                   "zero_lengths": zero_lengths}
        meta = base_meta(seed, source={"kind": kind, "path": str(path), "columns": dict(columns),
                                       "time_unit": time_unit, **options,
                                       "report": report.to_dict()},
                         tokens=(tokens or TokenSpec()).to_meta())
        trace = make_trace(df.drop(columns=ROW), meta,
                           bounds=LengthBounds(max_model_len, "keep"), source=str(path))
    except TraceError as err:
        raise err.at(path) from None
    return trace, report


def _check_options(columns: Mapping[str, str], time_unit: str, start_s: float,
                   duration_s: float | None, rate_scale: float, max_model_len: int | None,
                   too_long: str, zero_lengths: str) -> float:
    for name in AZURE_COLUMNS:
        if name not in columns:
            raise SpecError(f"columns[{name!r}]", None, "the source column holding it")
    if time_unit not in TIME_UNITS:
        raise SpecError("time_unit", time_unit, f"one of {', '.join(TIME_UNITS)}")
    check_number("start_s", start_s, 0)
    if duration_s is not None:
        check_number("duration_s", duration_s, 0, lo_open=True)
    check_number("rate_scale", rate_scale, 0, lo_open=True)
    if max_model_len is not None:
        check_number("max_model_len", max_model_len, 2, integer=True)
    if too_long not in TOO_LONG_POLICIES:
        raise SpecError("too_long", too_long, "one of 'cap', 'drop', 'error', 'keep'")
    if zero_lengths not in ("clamp", "drop"):
        raise SpecError("zero_lengths", zero_lengths, "'clamp' or 'drop'")
    return float("inf") if duration_s is None else float(duration_s)


def _read_source(path: Path, columns: Mapping[str, str], time_unit: str,
                 rows: int) -> pd.DataFrame:
    """Source row, seconds (from the earliest row), lengths and passthrough fields."""
    header = csv_header(path)
    for field, name in columns.items():
        if name not in header:
            shown = header[:10] + (["..."] if len(header) > 10 else [])
            raise TraceError(name, 0, "<missing column>",
                             f"present (mapped to {field}); the file has {shown}")
    parts = []
    first = 0
    for chunk in csv_chunks(path, usecols=list(columns.values()), rows=rows):
        chunk.index = pd.RangeIndex(first, first + len(chunk))
        parts.append(_mapped(chunk, columns, time_unit))
        first += len(chunk)
    df = pd.concat(parts) if len(parts) > 1 else parts[0]
    if df.empty:
        raise TraceError("file", None, "<no rows>", "at least one request after the header")
    t = df.pop("t").to_numpy()
    if time_unit == "datetime":  # pandas' own float seconds, as before chunking
        df["t"] = pd.to_timedelta(t - t.min(), unit="ns").total_seconds().to_numpy()
    else:
        df["t"] = (t - t.min()) * TIME_UNITS[time_unit]
    return df


def _mapped(source: pd.DataFrame, columns: Mapping[str, str], time_unit: str) -> pd.DataFrame:
    df = pd.DataFrame({ROW: source.index.to_numpy(dtype=np.int64)}, index=source.index)
    df["request_id"] = df[ROW]
    df["t"] = _times(source[columns["arrival_s"]], columns["arrival_s"], time_unit)
    for field in ("prompt_len", "output_len"):
        df[field] = _lengths(source[columns[field]], columns[field])
    for field in PASSTHROUGH:
        if field in columns:
            df[field] = source[columns[field]].to_numpy()
    return df


def _times(values: pd.Series, name: str, time_unit: str) -> np.ndarray:
    """Nanoseconds since the epoch (datetime, int64) or the numbers as given (float64)."""
    if time_unit == "datetime":
        try:
            stamps = pd.to_datetime(values, format="ISO8601", errors="coerce", utc=True)
        except (ValueError, TypeError, OverflowError):
            stamps = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
        lo, hi = pd.Timestamp.min.tz_localize("UTC"), pd.Timestamp.max.tz_localize("UTC")
        bad = (stamps.isna() | (stamps < lo) | (stamps > hi)).to_numpy()
        _fail_first(bad, values, name, "a date-time (ISO 8601, years 1678 to 2261)")
        return stamps.dt.tz_convert(None).dt.as_unit("ns").to_numpy().view(np.int64)
    nums = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(nums) | (np.abs(nums) > 1e15)
    _fail_first(bad, values, name, f"a finite number ({time_unit}) within 1e15")
    return nums


def _lengths(values: pd.Series, name: str) -> np.ndarray:
    nums = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(nums) | (nums % 1 != 0) | (nums < 0) | (nums > MAX_STORED_LEN)
    _fail_first(bad, values, name, f"an integer in [0, {MAX_STORED_LEN}] (tokens)")
    return nums.astype(np.int64)


def _fail_first(mask: np.ndarray, values: pd.Series, name: str, allowed: str) -> None:
    bad = np.flatnonzero(mask)
    if bad.size:
        value = values.iloc[int(bad[0])]
        raise TraceError(name, int(values.index[int(bad[0])]),
                         value.item() if hasattr(value, "item") else value, allowed)


def _windowed(df: pd.DataFrame, start_s: float, duration_s: float, rate_scale: float,
              report: ImportReport) -> pd.DataFrame:
    inside = (df["t"] >= start_s) & (df["t"] < start_s + duration_s)
    report.outside_window = int((~inside).sum())
    if not inside.any():
        raise SpecError("start_s", start_s, f"inside the trace, which spans "
                        f"{df['t'].max():.3f} s (the window [{start_s}, {start_s + duration_s}) "
                        "holds no request)")
    df = df[inside].copy()
    df["arrival_s"] = (df.pop("t") - start_s) / rate_scale
    return df


def _zero_lengths(df: pd.DataFrame, policy: str, report: ImportReport) -> pd.DataFrame:
    zero_prompt, zero_output = df["prompt_len"] == 0, df["output_len"] == 0
    report.zero_prompt, report.zero_output = int(zero_prompt.sum()), int(zero_output.sum())
    if policy == "drop":
        return df[~(zero_prompt | zero_output)]
    return df.assign(prompt_len=df["prompt_len"].clip(lower=1),
                     output_len=df["output_len"].clip(lower=1))


def _too_long(df: pd.DataFrame, bounds: LengthBounds, policy: str, report: ImportReport,
              columns: Mapping[str, str]) -> pd.DataFrame:
    prompt, output = df["prompt_len"].to_numpy(), df["output_len"].to_numpy()
    over = bounds.over(prompt, output)
    report.too_long = int(over.sum())
    if policy == "keep" or not over.any():
        return df
    # a length over MAX_LEN is no real request: capping would invent one
    absurd = (prompt > MAX_LEN) | (output > MAX_LEN) if policy == "cap" else over
    if policy in ("error", "cap") and absurd.any():
        pos = int(np.flatnonzero(absurd)[0])
        err = LengthBounds(bounds.max_model_len if policy == "error" else None, "error").error(
            int(df[ROW].iloc[pos]), int(prompt[pos]), int(output[pos]))
        raise TraceError(columns[err.field], err.row, err.value, err.allowed)  # the file's name
    if policy == "drop":
        return df[~over]
    capped_prompt = np.minimum(prompt, bounds.prompt_max)
    capped_output = np.minimum(output, bounds.max_model_len - capped_prompt)
    report.capped_prompt = int((capped_prompt != prompt).sum())
    report.capped_output = int((capped_output != output).sum())
    return df.assign(prompt_len=capped_prompt, output_len=capped_output)
