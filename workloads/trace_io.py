"""Read and write traces as Parquet, CSV or JSONL, metadata included, losslessly.

Parquet keeps the metadata as JSON under the schema-metadata key `kvtwin`. CSV and JSONL keep it
in a sidecar `<file>.meta.json` next to the file (a file without one loads with empty metadata).
In CSV, a prompt_token_ids cell is the ids separated by spaces; empty cells are nulls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from workloads.errors import SpecError, TraceError
from workloads.schema import ALL_COLUMNS, TOKENS_COLUMN, Trace
from workloads.validate import make_trace

META_KEY = b"kvtwin"
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
           ".ndjson": "jsonl"}
ARROW_TYPES = {"request_id": pa.int64(), "arrival_s": pa.float64(), "prompt_len": pa.int64(),
               "output_len": pa.int64(), "prefix_group": pa.int64(), "prefix_len": pa.int64(),
               "conversation_id": pa.int64(), "turn": pa.int64(),
               TOKENS_COLUMN: pa.list_(pa.int32())}


def trace_format(path: str | Path, fmt: str | None = None) -> str:
    if fmt is not None:
        if fmt not in set(FORMATS.values()):
            raise SpecError("format", fmt, "one of parquet, csv, jsonl")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise SpecError("path", str(path), f"a file ending in one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def write_trace(trace: Trace, path: str | Path, fmt: str | None = None) -> Path:
    """Write `trace` (format from the suffix unless `fmt`); returns the path."""
    path = Path(path)
    kind = trace_format(path, fmt)
    {"parquet": _write_parquet, "csv": _write_csv, "jsonl": _write_jsonl}[kind](trace, path)
    if kind != "parquet":
        sidecar_path(path).write_text(_meta_json(trace.meta) + "\n")
    return path


def read_trace(path: str | Path, fmt: str | None = None) -> Trace:
    """Read and validate a trace (see validate.make_trace for the checks)."""
    path = Path(path)
    kind = trace_format(path, fmt)
    if not path.is_file():
        raise FileNotFoundError(f"trace not found: {path}")
    if kind == "parquet":
        raw, meta = _read_parquet(path)
    else:
        raw = _read_csv(path) if kind == "csv" else _read_jsonl(path)
        side = sidecar_path(path)
        meta = json.loads(side.read_text()) if side.is_file() else {}
    return make_trace(raw, meta)


def _meta_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, indent=1)


def _write_parquet(trace: Trace, path: Path) -> None:
    columns = [c for c in ALL_COLUMNS if c in trace.df]
    arrays = [_arrow_column(trace.df[c], c) for c in columns]
    schema = pa.schema([pa.field(c, ARROW_TYPES[c]) for c in columns],
                       metadata={META_KEY: _meta_json(trace.meta).encode()})
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path)


def _arrow_column(series: pd.Series, name: str) -> pa.Array:
    if name == TOKENS_COLUMN:
        offsets = np.zeros(len(series) + 1, dtype=np.int32)
        np.cumsum(series.map(len).to_numpy(), out=offsets[1:])
        flat = np.concatenate([np.zeros(0, np.int32), *series]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return pa.array(series, type=ARROW_TYPES[name], from_pandas=True)


def _read_parquet(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    table = pq.read_table(path)
    raw_meta = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw_meta) if raw_meta else {}
    df = table.to_pandas(types_mapper=lambda t: pd.Int64Dtype() if pa.types.is_integer(t)
                         else None)
    return df, meta


def _write_csv(trace: Trace, path: Path) -> None:
    df = trace.df.copy()
    if TOKENS_COLUMN in df:
        df[TOKENS_COLUMN] = [" ".join(map(str, np.asarray(t).tolist())) for t in df[TOKENS_COLUMN]]
    df.to_csv(path, index=False, lineterminator="\n")


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])


def _write_jsonl(trace: Trace, path: Path) -> None:
    columns = list(trace.df.columns)
    lists = {c: _plain_list(trace.df[c]) for c in columns}
    with path.open("w") as out:
        for i in range(len(trace)):
            out.write(json.dumps({c: lists[c][i] for c in columns}) + "\n")


def _plain_list(series: pd.Series) -> list[Any]:
    if series.name == TOKENS_COLUMN:
        return [np.asarray(t).tolist() for t in series]
    if isinstance(series.dtype, pd.Int64Dtype):
        return [None if v is pd.NA else int(v) for v in series]
    return series.tolist()


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    with path.open() as lines:
        for line in lines:
            if line.strip():
                rows.append(_json_row(line, len(rows)))
    names = [c for c in ALL_COLUMNS if any(c in r for r in rows)]
    return pd.DataFrame({c: pd.Series([r.get(c) for r in rows], dtype=object) for c in names})


def _json_row(line: str, row: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise TraceError("<line>", row, line.strip()[:60], f"valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise TraceError("<line>", row, line.strip()[:60], "a JSON object")
    return value
