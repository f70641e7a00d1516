"""Read and write traces as Parquet, CSV or JSONL, metadata included, losslessly.

Parquet keeps the metadata as JSON under the schema-metadata key `kvtwin`. CSV and JSONL keep it
in a sidecar `<file>.meta.json` next to the file (a file without one loads with empty metadata).
In CSV, a prompt_token_ids cell is the ids separated by spaces; empty cells are nulls.

Reading streams: Parquet record batches, CSV and JSONL chunks of rows, each validated as it
comes (lengths against their bounds first, see workloads.bounds), so memory follows the rows
read, never a value in them. Whatever is wrong with a file ends in one TraceError naming it
(and the row and column where a row is at fault).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from workloads.bounds import LengthBounds
from workloads.errors import SpecError, TraceError
from workloads.schema import ALL_COLUMNS, TOKENS_COLUMN, Trace
from workloads.streams import (
    CHUNK_ROWS,
    check_file,
    csv_chunks,
    csv_header,
    jsonl_rows,
    read_json_object,
)
from workloads.validate import TraceBuilder

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


def read_trace(path: str | Path, fmt: str | None = None, *, max_model_len: int | None = None,
               too_long: str = "error", unsorted: str = "sort",
               chunk_rows: int = CHUNK_ROWS) -> Trace:
    """Read and validate a trace (see validate.make_trace for the checks), a chunk at a time.

    Lengths are bounded by the schema's MAX_LEN and, given `max_model_len`, by
    prompt_len + output_len <= max_model_len; too_long="keep" keeps longer requests (for the
    scheduler to reject) instead of raising. unsorted="error" refuses unsorted arrivals.
    """
    path = Path(path)
    kind = trace_format(path, fmt)
    bounds = LengthBounds(max_model_len, too_long)
    check_file(path, kind)
    try:
        columns, chunks, meta = _open(path, kind, chunk_rows)
        builder = TraceBuilder(columns, bounds, unsorted, source=str(path))
        for chunk in chunks:
            builder.add(chunk)
        return builder.trace(meta)
    except TraceError as err:
        raise err.at(path) from None


def _open(path: Path, kind: str, rows: int
          ) -> tuple[list[str], Iterator[pd.DataFrame], dict[str, Any]]:
    """(column names, chunks of raw rows, metadata) of a trace file."""
    if kind == "parquet":
        return _parquet_chunks(path, rows)
    side = sidecar_path(path)
    meta = read_json_object(side, "metadata") if side.is_file() else {}
    if kind == "csv":
        return csv_header(path), csv_chunks(path, rows=rows), meta
    return _jsonl_chunks(path, rows) + (meta,)


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


def _parquet_chunks(path: Path, rows: int
                    ) -> tuple[list[str], Iterator[pd.DataFrame], dict[str, Any]]:
    try:
        file = pq.ParquetFile(path)
        schema = file.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as err:
        raise TraceError("file", None, f"<{_first_line(err)}>",
                         "a Parquet file (as kvtwin, pandas or pyarrow write one)") from None
    raw_meta = (schema.metadata or {}).get(META_KEY)
    meta = _parquet_meta(raw_meta) if raw_meta else {}
    names = list(schema.names)
    return names, _parquet_batches(file, _schema_columns(names), rows), meta


def _parquet_meta(raw: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise TraceError("metadata", None, raw[:60], "a JSON object under the key 'kvtwin'")
    return meta


def _parquet_batches(file: pq.ParquetFile, columns: list[str],
                     rows: int) -> Iterator[pd.DataFrame]:
    batches = file.iter_batches(batch_size=rows, columns=columns, use_threads=False)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, ValueError) as err:
            raise TraceError("file", None, f"<{_first_line(err)}>",
                             "a readable Parquet file") from None
        yield pd.DataFrame({name: _pandas_column(column, name)
                            for name, column in zip(batch.schema.names, batch.columns,
                                                    strict=True)})


def _pandas_column(column: pa.Array, name: str) -> pd.Series:
    """Integers exactly (nullable Int64 / UInt64), anything else as pandas makes it."""
    kind = column.type
    try:
        if pa.types.is_signed_integer(kind):
            return column.cast(pa.int64()).to_pandas(types_mapper=_as_int64)
        if pa.types.is_unsigned_integer(kind):
            return column.cast(pa.uint64()).to_pandas(types_mapper=_as_uint64)
        return column.to_pandas()
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as err:
        raise TraceError(name, None, f"<{kind}: {_first_line(err)}>",
                         "integers, numbers or text") from None


def _as_int64(_: pa.DataType) -> pd.api.extensions.ExtensionDtype:
    return pd.Int64Dtype()


def _as_uint64(_: pa.DataType) -> pd.api.extensions.ExtensionDtype:
    return pd.UInt64Dtype()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:120] if text else type(err).__name__


def _write_csv(trace: Trace, path: Path) -> None:
    df = trace.df.copy()
    if TOKENS_COLUMN in df:
        df[TOKENS_COLUMN] = [" ".join(map(str, np.asarray(t).tolist())) for t in df[TOKENS_COLUMN]]
    df.to_csv(path, index=False, lineterminator="\n")


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


def _schema_columns(names: list[str]) -> list[str]:
    """The schema's columns among `names` (TraceBuilder checks and warns about the rest)."""
    return [c for c in ALL_COLUMNS if c in names]


def _jsonl_chunks(path: Path, rows: int) -> tuple[list[str], Iterator[pd.DataFrame]]:
    """The columns are the keys of the first chunk of rows; a key of the schema first met
    later is an error (a row without a key has a null there)."""
    chunks = jsonl_rows(path, rows)
    first = next(chunks, [])
    keys = list(dict.fromkeys(k for row in first for k in row))
    return keys, _jsonl_frames(first, chunks, _schema_columns(keys))


def _jsonl_frames(first: list[dict[str, Any]], rest: Iterator[list[dict[str, Any]]],
                  known: list[str]) -> Iterator[pd.DataFrame]:
    done = 0
    for chunk in itertools.chain([first], rest):
        for pos, row in enumerate(chunk):
            late = next((k for k in row if k in ALL_COLUMNS and k not in known), None)
            if late is not None:
                raise TraceError(late, done + pos, row[late],
                                 f"absent: the first {len(first)} rows have no {late}")
        done += len(chunk)
        yield pd.DataFrame({c: pd.Series([r.get(c) for r in chunk], dtype=object)
                            for c in known})
